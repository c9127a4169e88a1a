"""The synthetic world: sampling, drawing, captions, and the attribute oracle that reads it back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from parti_ops.model.scenes import (
    BACKGROUNDS,
    COLOURS,
    NEAR_MISSES,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    compare,
    describe,
    heldout_pairs,
    near_misses,
    read_scene,
    render,
    sample_scene,
)


@pytest.fixture(scope="module")
def drawn() -> list[tuple[Scene, Image.Image]]:
    """1,000 scenes at 64×64, half of them held out, with their pictures."""
    rng = np.random.default_rng(1234)
    scenes = [sample_scene(rng, heldout=i % 2 == 1) for i in range(1000)]
    return [(scene, render(scene, image_size=64, rng=rng)) for scene in scenes]


def _exact_rate(pairs: list[tuple[Scene, Image.Image | np.ndarray]]) -> float:
    return sum(read_scene(image) == scene for scene, image in pairs) / len(pairs)


def test_oracle_reads_clean_images_exactly(drawn):
    rate = _exact_rate(drawn)
    print(f"oracle exact on clean 64x64: {rate:.1%}")
    assert rate >= 0.99


def test_oracle_survives_blur_and_noise(drawn):
    # Mild stand-ins for a VQGAN round trip: a 3×3 box blur, then Gaussian noise σ = 8/255.
    rng = np.random.default_rng(5)
    degraded = []
    for scene, image in drawn:
        blurred = np.asarray(image.filter(ImageFilter.BoxBlur(1)), np.float32)
        noisy = np.clip(np.rint(blurred + rng.normal(0, 8, blurred.shape)), 0, 255)
        degraded.append((scene, noisy.astype(np.uint8)))
    rate = _exact_rate(degraded)
    print(f"oracle exact on blurred + noisy 64x64: {rate:.1%}")
    assert rate >= 0.95


@pytest.mark.parametrize("size", [32, 50, 100, 256])
def test_oracle_reads_other_sizes(size):
    rng = np.random.default_rng(size)
    for _ in range(20):
        scene = sample_scene(rng, heldout=False)
        image = render(scene, image_size=size, rng=rng)
        assert image.size == (size, size) and image.mode == "RGB"
        assert read_scene(np.asarray(image)) == scene


def test_oracle_ignores_speckle():
    rng = np.random.default_rng(0)
    for background, rgb in BACKGROUNDS.items():
        pixels = np.empty((64, 64, 3), np.uint8)
        pixels[:] = rgb
        # Forty isolated single pixels of object colours: noise, not objects.
        ys, xs = rng.integers(0, 64, size=(2, 40))
        pixels[ys, xs] = COLOURS["red"]
        assert read_scene(pixels) == Scene(background, ())


def test_objects_stay_inside_their_cells():
    rng = np.random.default_rng(7)
    for _ in range(200):
        scene = sample_scene(rng, heldout=False)
        pixels = np.asarray(render(scene, image_size=64, rng=rng))
        drawn = np.any(pixels != BACKGROUNDS[scene.background], axis=-1)
        allowed = np.zeros_like(drawn)
        for obj in scene.objects:
            row, col = divmod(POSITIONS.index(obj.position), 3)
            # Cells are the pixels whose centres fall in them: 0..20, 21..42, 43..63 at 64.
            edges = [0, 21, 43, 64]
            allowed[edges[row] : edges[row + 1], edges[col] : edges[col + 1]] = True
        assert not (drawn & ~allowed).any()


def test_render_is_a_function_of_the_rng():
    scene = sample_scene(np.random.default_rng(3), heldout=False)
    first = render(scene, rng=np.random.default_rng(9))
    again = render(scene, rng=np.random.default_rng(9))
    assert first.tobytes() == again.tobytes()


def test_captions_state_every_attribute():
    rng = np.random.default_rng(11)
    for _ in range(500):
        scene = sample_scene(rng, heldout=bool(rng.integers(2)))
        caption = describe(scene, rng)
        assert f"{scene.background} background" in caption
        for obj in scene.objects:
            phrase = f"a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}"
            assert phrase in caption


def test_captions_vary_in_phrasing():
    scene = sample_scene(np.random.default_rng(0), heldout=False)
    rng = np.random.default_rng(1)
    assert len({describe(scene, rng) for _ in range(100)}) >= 4


def test_heldout_pairs_hold_out_every_colour_and_shape_once():
    pairs = heldout_pairs()
    assert sorted(c for c, _ in pairs) == sorted(COLOURS)
    assert sorted(s for _, s in pairs) == sorted(SHAPES)


def test_sample_scene_keeps_heldout_pairs_apart():
    rng = np.random.default_rng(2)
    held = heldout_pairs()
    for _ in range(2000):
        seen = sample_scene(rng, heldout=False)
        assert not any((o.colour, o.shape) in held for o in seen.objects)
        novel = sample_scene(rng, heldout=True)
        assert any((o.colour, o.shape) in held for o in novel.objects)
        for scene in (seen, novel):
            assert 1 <= len(scene.objects) <= 2
            assert len({o.position for o in scene.objects}) == len(scene.objects)


def test_scene_is_order_free_and_round_trips_through_json():
    a = SceneObject("star", "blue", "bottom right", "small")
    b = SceneObject("circle", "red", "top left", "large")
    scene = Scene("white", (a, b))
    assert scene == Scene("white", (b, a))
    assert scene.objects == (b, a)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_invalid_scenes_are_refused():
    with pytest.raises(ValueError, match="shape='hexagon'"):
        SceneObject("hexagon", "red", "top", "small")
    with pytest.raises(ValueError, match="background"):
        Scene("pink", ())
    obj = SceneObject("circle", "red", "top", "small")
    with pytest.raises(ValueError, match="cell"):
        Scene("white", (obj, SceneObject("star", "blue", "top", "large")))


def test_compare_scores_each_attribute():
    truth = Scene(
        "white",
        (
            SceneObject("circle", "red", "top left", "large"),
            SceneObject("star", "blue", "right", "small"),
        ),
    )
    assert all(compare(truth, truth).values())
    swapped = Scene(
        "white",
        (
            SceneObject("star", "red", "top left", "large"),
            SceneObject("circle", "blue", "right", "small"),
        ),
    )
    result = compare(swapped, truth)
    # Same shapes and colours, bound the other way round.
    assert result["shape"] and result["colour"] and result["position"] and result["size"]
    assert not result["binding"] and not result["exact"]
    empty = compare(Scene("black", ()), truth)
    assert not any(empty.values())
    assert set(result) == {
        "background",
        "count",
        "shape",
        "colour",
        "position",
        "size",
        "binding",
        "exact",
    }


def test_near_misses_change_one_attribute_each_and_make_no_heldout_pair():
    rng = np.random.default_rng(3)
    held = heldout_pairs()
    for i in range(200):
        scene = sample_scene(rng, heldout=i % 2 == 1)
        misses = near_misses(scene, rng)
        changed = []
        for miss in misses:
            assert miss != scene
            made = {(o.colour, o.shape) for o in miss.objects} - {
                (o.colour, o.shape) for o in scene.objects
            }
            assert not made & held
            wrong = [k for k, ok in compare(miss, scene).items() if not ok]
            changed.append(sorted(set(wrong) - {"exact", "binding"}))
        assert changed == [[k] for k in NEAR_MISSES]
        assert all(len(miss.objects) == len(scene.objects) for miss in misses)
    empty = Scene("white", ())
    (only,) = near_misses(empty, rng)
    assert only.objects == () and only.background != "white"
