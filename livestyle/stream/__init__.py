"""Streaming: few-step samplers as plain functions, and restyling frames with a model."""
