import numpy as np
import pytest
from skimage import data

from livestyle.capture.synthetic import CameraPath, flow_to_previous, motion_clip, render
from livestyle.metrics import warp

SIZE = (96, 80)  # (w, h)


@pytest.fixture(scope="module")
def image():
    return data.astronaut()  # (512, 512, 3) uint8, textured


def _mean_abs_warp_error(frames, flows, valid):
    f = frames.astype(np.float32) / 255
    errors = [np.abs(warp(f[t], flows[t]) - f[t + 1])[valid[t]].mean() for t in range(len(flows))]
    return float(np.mean(errors))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_flow_carries_frame_t_onto_frame_t_plus_1(image, seed):
    rng = np.random.default_rng(seed)
    path = CameraPath.random(rng, (512, 512), SIZE, frames=6)
    frames, flows, valid = motion_clip(image, path, 6, SIZE)
    assert frames.shape == (6, 80, 96, 3) and frames.dtype == np.uint8
    assert flows.shape == (5, 80, 96, 2) and flows.dtype == np.float32
    assert valid.shape == (5, 80, 96) and valid.dtype == bool
    assert valid.mean() > 0.8  # random paths stay inside the image
    err = _mean_abs_warp_error(frames, flows, valid)
    wrong = _mean_abs_warp_error(frames, np.zeros_like(flows), valid)
    assert err < 0.02
    assert wrong > 2 * err  # a wrong (zero) flow is clearly worse


def test_zoom_and_rotation_flow(image):
    # Zooming in: the frame corners move outward, so their flow points back inward.
    zoom_flow, _ = flow_to_previous(CameraPath((512, 512), center=(256, 256), zoom=1.01), 0, SIZE)
    assert (zoom_flow[0, 0] > 0).all() and (zoom_flow[-1, -1] < 0).all()
    np.testing.assert_allclose(zoom_flow[0, 0], (np.array(SIZE) - 1) / 2 * (1 - 1 / 1.01), rtol=1e-4)
    # Turning the camera by +r degrees (y down) turns the content by -r about the frame
    # centre o: pixel p of frame 1 was at o + R(r) (p - o) in frame 0.
    turn_flow, _ = flow_to_previous(CameraPath((512, 512), center=(256, 256), rotation=1.0), 0, SIZE)
    r = np.deg2rad(1.0)
    w, h = SIZE
    d = np.array([w - 1, 0]) - np.array([(w - 1) / 2, (h - 1) / 2])  # top-right corner minus o
    expected = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]]) @ d - d
    np.testing.assert_allclose(turn_flow[0, -1], expected, rtol=1e-4)
    assert turn_flow[0, -1, 1] > 0 and turn_flow[-1, 0, 1] < 0  # right side moves up, left side down

    path = CameraPath((512, 512), center=(256, 256), scale=1.3, angle=5, zoom=1.01, rotation=0.8)
    frames, flows, valid = motion_clip(image, path, 4, SIZE)
    err = _mean_abs_warp_error(frames, flows, valid)
    assert err < 0.02
    assert _mean_abs_warp_error(frames, np.zeros_like(flows), valid) > 2 * err


def test_pure_pan_flow_and_valid_band():
    path = CameraPath((400, 300), center=(200, 150), pan=(5.0, 0.0))
    w, h = SIZE
    flow, valid = flow_to_previous(path, 0, SIZE)
    np.testing.assert_allclose(flow[..., 0], 5.0, atol=1e-5)
    np.testing.assert_allclose(flow[..., 1], 0.0, atol=1e-5)
    # Pixel x of frame 1 shows what was at x + 5 in frame 0: the right band (5 px of
    # new content plus the 1 px margin) has no counterpart; the left side all does.
    assert not valid[:, w - 6 :].any()
    assert valid[1:-1, : w - 6].all()
    assert not valid[0].any() and not valid[-1].any()  # the 1 px margin


def test_pan_left_invalidates_left_band():
    path = CameraPath((400, 300), center=(200, 150), pan=(-3.0, 0.0))
    flow, valid = flow_to_previous(path, 2, SIZE)
    np.testing.assert_allclose(flow[..., 0], -3.0, atol=1e-5)
    assert not valid[:, :4].any()
    assert valid[1:-1, 4:-1].all()


def test_reflected_border_is_invalid(image):
    # The view's left half hangs off the source image's left edge (x < 0).
    path = CameraPath((512, 512), center=(10.0, 256.0), pan=(1.0, 0.0))
    frames, flows, valid = motion_clip(image, path, 3, SIZE)
    x_src = 10.0 + 1.0 - (SIZE[0] - 1) / 2 + np.arange(SIZE[0])  # source x of frame 1's columns
    assert not valid[0][:, x_src < 0].any()
    assert valid[0][1:-1, (x_src >= 0) & (np.arange(SIZE[0]) < SIZE[0] - 2)].all()


def test_zoomed_out_render_is_antialiased():
    # A 1 px checkerboard seen at 4 source px per output px must average to grey,
    # not alias into a pattern.
    board = ((np.indices((400, 400)).sum(0) % 2) * 255).astype(np.uint8)
    board = np.repeat(board[..., None], 3, axis=-1)
    path = CameraPath((400, 400), center=(200, 200), scale=4.0)
    frame = render(board, path, 1, (64, 64))[0].astype(np.float32)
    assert abs(frame.mean() - 127.5) < 3 and frame.std() < 3


def test_render_is_deterministic_and_checks_size(image):
    path = CameraPath.random(np.random.default_rng(7), (512, 512), SIZE, frames=4)
    a = render(image, path, 4, SIZE)
    b = render(image, path, 4, SIZE)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[-1])  # the camera moves
    with pytest.raises(ValueError, match="image_size|W, H"):
        render(image[:500], path, 4, SIZE)


def test_random_paths_vary_and_stay_inside():
    rng = np.random.default_rng(0)
    paths = [CameraPath.random(rng, (640, 427), (128, 128), frames=30) for _ in range(20)]
    speeds = [np.hypot(*p.pan) / p.scale for p in paths]  # output px per frame
    assert max(speeds) <= 4.0 + 1e-9 and np.std(speeds) > 0.3
    assert len({round(p.rotation, 6) for p in paths}) == 20
    for p in paths:
        for t in (0, 29):
            M = p.affine(t, (128, 128))
            corners = M @ np.array([[0, 127, 0, 127], [0, 0, 127, 127], [1, 1, 1, 1]], np.float64)
            assert corners.min() >= 0 and corners[0].max() <= 639 and corners[1].max() <= 426
