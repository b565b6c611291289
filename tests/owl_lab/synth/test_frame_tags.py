"""World option ``frame_tags`` (issue 18's numbered frames): image k of a labelled multi-image prompt is
drawn on a background tinted with k's tag; objects and unlabelled (single-image) prompts are unchanged."""

from __future__ import annotations

import random

import numpy as np
import pytest

from owl_lab.synth.binding_train import task_find
from owl_lab.synth.data import Mixture
from owl_lab.synth.distractor import MAX_IMAGES, circular_eval
from owl_lab.synth.multi import task_multi
from owl_lab.synth.shapes import BACKGROUND, FRAME_TAGS, frame_tag_color, render, sample_scene, with_frame_tag
from owl_lab.synth.tasks import scene_question


def _background_color(image) -> tuple[int, int, int]:
    """The most common pixel colour (at most 4 of the 9 cells hold an object)."""
    colors, counts = np.unique(np.asarray(image).reshape(-1, 3), axis=0, return_counts=True)
    return tuple(int(v) for v in colors[counts.argmax()])


def test_tags_are_distinct_dark_and_cover_every_label():
    assert len(set(FRAME_TAGS)) == len(FRAME_TAGS) >= MAX_IMAGES
    assert all(max(c) <= 72 and not c[0] == c[1] == c[2] for c in FRAME_TAGS)
    with pytest.raises(ValueError, match="label"):
        frame_tag_color(0)


def test_with_frame_tag_recolours_only_the_background():
    scene = sample_scene(random.Random(3), 4, 4)
    plain = np.asarray(render(scene, 112))
    tagged = np.asarray(with_frame_tag(render(scene, 112), 7))
    background = (plain == np.asarray(BACKGROUND, dtype=np.uint8)).all(-1)
    assert (tagged[background] == frame_tag_color(7)).all()
    assert (tagged[~background] == plain[~background]).all() and (~background).any()


def test_benchmark_and_training_prompts_carry_the_label_tags():
    for g in circular_eval(4, 5, 5, render_size=28, frame_tags=True):
        for ex in g:
            assert [_background_color(im) for im in ex.images] == [frame_tag_color(k) for k in range(1, 6)]
    untagged = circular_eval(4, 5, 5, render_size=28)
    assert {_background_color(im) for g in untagged for ex in g for im in ex.images} == {BACKGROUND}
    ex = task_find(random.Random(1), render_size=28, binding_n=6, frame_tags=True)
    assert [_background_color(im) for im in ex.images] == [frame_tag_color(k) for k in range(1, 7)]
    ex = task_multi(random.Random(2), render_size=28, multi_max_images=3, frame_tags=True)
    assert [_background_color(im) for im in ex.images] == [
        frame_tag_color(k) for k in range(1, len(ex.images) + 1)
    ]


def test_option_leaves_the_untagged_streams_and_single_image_tasks_unchanged():
    weights = {"binding": 1, "color": 1}
    plain, tagged = (
        Mixture(weights, seed=0, render_size=28),
        Mixture(weights, seed=0, render_size=28, frame_tags=True),
    )
    for step in range(6):
        a, b = plain.binding_batch(step, 4), tagged.binding_batch(step, 4)
        assert [e.text for e in a] == [e.text for e in b]
        for ea, eb in zip(a, b, strict=True):
            if ea.task == "color":  # single-image questions: pixels identical
                assert all(
                    (np.asarray(x) == np.asarray(y)).all() for x, y in zip(ea.images, eb.images, strict=True)
                )
    assert scene_question(random.Random(0), "color") == scene_question(random.Random(0), "color")


def test_suffix_prompts_put_the_label_before_the_answer():
    from owl_lab.synth.binding_train import task_binding
    from owl_lab.synth.distractor import suffix_prompt
    from owl_lab.synth.tokenizer import build_tokenizer

    assert suffix_prompt(2, 2, "What color is the circle?") == (
        "Image 1: <|image|> Image 2: <|image|> What color is the circle in Image 2?"
    )
    with pytest.raises(ValueError, match="target"):
        suffix_prompt(2, 3, "What?")
    tok = build_tokenizer("owl3")
    exs = [
        task_binding(random.Random(i), render_size=28, binding_n=3, binding_suffix_share=0.5)
        for i in range(40)
    ]
    suffixed = [e for e in exs if e.meta.get("suffix")]
    assert 5 < len(suffixed) < 35
    for e in suffixed:
        assert (
            e.text.endswith(f"in Image {e.meta['target']}?")
            and tok.unk_token_id not in tok(e.text)["input_ids"]
        )
    # off by default: the stream of the paper-format task is unchanged
    plain = [task_binding(random.Random(i), render_size=28, binding_n=3) for i in range(10)]
    assert all(not e.meta.get("suffix") and ", " in e.text for e in plain)


# --- mode "all": the label also shifts every object pixel (issue 18, second session) ---------------


def test_all_mode_shifts_object_pixels_by_the_label_offset_and_tints_the_background():
    from owl_lab.synth.shapes import OBJECT_TAG_OFFSETS, object_tag_offset

    assert len(set(OBJECT_TAG_OFFSETS)) == len(OBJECT_TAG_OFFSETS) >= MAX_IMAGES
    scene = sample_scene(random.Random(5), 4, 4)
    plain = np.asarray(render(scene, 112)).astype(int)
    tagged = np.asarray(with_frame_tag(render(scene, 112), 9, "all")).astype(int)
    background = (plain == np.asarray(BACKGROUND)).all(-1)
    assert (tagged[background] == frame_tag_color(9)).all()
    expected = (plain[~background] + np.asarray(object_tag_offset(9))).clip(0, 255)
    assert (tagged[~background] == expected).all() and (tagged[~background] != plain[~background]).any()
    # the background-only mode (true) is unchanged by the new argument
    assert (
        np.asarray(with_frame_tag(render(scene, 112), 9, True))
        == np.asarray(with_frame_tag(render(scene, 112), 9))
    ).all()
    with pytest.raises(ValueError, match="frame_tags"):
        with_frame_tag(render(scene, 112), 9, "object")


def test_all_mode_keeps_every_colour_nearest_to_its_own_name_under_every_offset():
    """Colour answers stay unambiguous: an object's mean colour plus any label's offset is still nearer
    to its own RGB than to any other colour's (with a margin), and so is each pattern tone's."""
    from owl_lab.synth.shapes import OBJECT_TAG_OFFSETS, PATTERN_DELTA, RGB

    names = list(RGB)
    for name in names:
        for offset in OBJECT_TAG_OFFSETS:
            shifted = np.asarray(RGB[name]) + np.asarray(offset)
            dist = {other: np.abs(shifted - np.asarray(RGB[other])).max() for other in names}
            nearest = min(dist, key=dist.get)
            assert nearest == name and min(d for o, d in dist.items() if o != name) - dist[name] >= 20, (
                name,
                offset,
            )
    assert max(max(abs(v) for v in o) for o in OBJECT_TAG_OFFSETS) < PATTERN_DELTA


def test_sparse_labels_name_slots_by_other_numbers_and_the_tags_follow_the_labels():
    from owl_lab.synth.binding_train import task_binding

    exs = [
        task_binding(
            random.Random(i), render_size=28, binding_n=4, binding_sparse_share=0.5, frame_tags="all"
        )
        for i in range(30)
    ]
    sparse = [e for e in exs if "labels" in e.meta]
    assert 5 < len(sparse) < 25
    for e in sparse:
        labels = e.meta["labels"]
        assert labels == sorted(set(labels)) and len(labels) == 4 and max(labels) <= 50
        assert e.text.startswith(" ".join(f"Image {k}: <|image|>" for k in labels))
        assert f"In Image {labels[e.meta['target'] - 1]}," in e.text
        assert [_background_color(im) for im in e.images] == [frame_tag_color(k) for k in labels]
    ex = task_find(random.Random(3), render_size=28, binding_n=5, frame_tags=True, binding_sparse_share=1.0)
    shown = [int(w.rstrip(":")) for w in ex.text.split() if w.endswith(":")]  # "Image 34:" → 34
    assert shown != [1, 2, 3, 4, 5] and ex.answer == str(shown[ex.meta["target"] - 1])
    assert _background_color(ex.images[ex.meta["target"] - 1]) == frame_tag_color(int(ex.answer))
    # off by default: the stream is unchanged
    a = [task_binding(random.Random(i), render_size=28, binding_n=3) for i in range(8)]
    b = [
        task_binding(random.Random(i), render_size=28, binding_n=3, binding_sparse_share=0.0)
        for i in range(8)
    ]
    assert [e.text for e in a] == [e.text for e in b]


# --- mode "objects": the label only in object pixels, plain background (issue 18, session 12) -------


def test_objects_mode_shifts_only_object_pixels_and_keeps_the_background_plain():
    from owl_lab.synth.shapes import n_frame_tags, object_tag_offset

    scene = sample_scene(random.Random(5), 4, 4)
    plain = np.asarray(render(scene, 112)).astype(int)
    background = (plain == np.asarray(BACKGROUND)).all(-1)
    for label in (1, 9, 50):
        tagged = np.asarray(with_frame_tag(render(scene, 112), label, "objects")).astype(int)
        assert (tagged[background] == np.asarray(BACKGROUND)).all()
        expected = (plain[~background] + np.asarray(object_tag_offset(label))).clip(0, 255)
        assert (tagged[~background] == expected).all() and (tagged[~background] != plain[~background]).any()
        # the object pixels are exactly those of mode "all"; only the background differs
        both = np.asarray(with_frame_tag(render(scene, 112), label, "all")).astype(int)
        assert (both[~background] == tagged[~background]).all() and (
            both[background] != tagged[background]
        ).any()
    assert n_frame_tags("objects") == n_frame_tags("all") >= MAX_IMAGES


def test_objects_mode_find_prompts_tag_each_slot_by_its_label_and_not_the_background():
    from owl_lab.synth.shapes import object_tag_offset

    ex = task_find(
        random.Random(3), render_size=56, binding_n=5, frame_tags="objects", binding_sparse_share=1.0
    )
    shown = [int(w.rstrip(":")) for w in ex.text.split() if w.endswith(":")]
    for label, im in zip(shown, ex.images, strict=True):
        assert _background_color(im) == BACKGROUND
        pixels = np.asarray(im).reshape(-1, 3).astype(int)
        objects = pixels[(pixels != np.asarray(BACKGROUND)).any(-1)]
        # every object tone is some palette tone plus this label's offset: the offset is recoverable
        from owl_lab.synth.shapes import PATTERN_DELTA, RGB

        tones = {tuple(np.asarray(c) + d) for c in RGB.values() for d in (-PATTERN_DELTA, 0, PATTERN_DELTA)}
        offset = np.asarray(object_tag_offset(label))
        assert all(tuple(p - offset) in tones for p in objects if (p > 0).all() and (p < 255).all())


def test_bad_frame_tags_values_fail_early_with_a_clear_error(tmp_path):
    import json

    from owl_lab.recipes import load_recipe

    with pytest.raises(ValueError, match="world option frame_tags must be"):
        Mixture({"binding": 1}, seed=0, frame_tags="object")
    good = load_recipe("owl3-bind-tags3")
    bad = tmp_path / "bad.json"
    stages = [dict(st) for st in good["stages"]]
    stages[1] = {**stages[1], "world": {**stages[1].get("world", {}), "frame_tags": "bg"}}
    bad.write_text(json.dumps({**good, "stages": stages}))
    with pytest.raises(ValueError, match=r"stages\[1\]\.world: frame_tags must be"):
        load_recipe(bad)
    assert good["world"]["frame_tags"] == "objects"


# --- mode "dots": absolute label tints on a patch-aligned dot lattice (issue 18, session 12b) --------


def test_older_modes_draw_bit_identical_images():
    """Adding mode "dots" must not change a pixel of the modes shipped checkpoints were trained on: the
    digest was computed with the code of main at 15e6a81 (before the mode existed)."""
    import hashlib

    digest = hashlib.sha256()
    for i in range(6):
        scene = sample_scene(random.Random(i), 1, 8)
        for size in (56, 112):
            for mode in (True, "background", "all", "objects"):
                digest.update(np.asarray(with_frame_tag(render(scene, size), 1 + 7 * i, mode)).tobytes())
    assert digest.hexdigest() == "332da4d562e5cfd0bd26cc6eca1db60e051c6f75d79ffbc7c5041132fae89505"


def test_dots_mode_paints_only_lattice_object_pixels_with_the_label_tint():
    from owl_lab.synth.shapes import dot_lattice, n_frame_tags, object_dot_tint

    scene = sample_scene(random.Random(5), 4, 4)
    for size in (56, 112):
        plain = np.asarray(render(scene, size)).astype(int)
        objects = ~(plain == np.asarray(BACKGROUND)).all(-1)
        dots = objects & dot_lattice(size)
        for label in (1, 9, 50, 64):
            tagged = np.asarray(with_frame_tag(render(scene, size), label, "dots")).astype(int)
            assert dots.sum() > 0 and (tagged[dots] == np.asarray(object_dot_tint(label))).all()
            assert (tagged[~dots] == plain[~dots]).all()  # background and off-lattice object pixels unchanged
    assert n_frame_tags("dots") >= MAX_IMAGES
    with pytest.raises(ValueError, match="label"):
        object_dot_tint(n_frame_tags("dots") + 1)


def test_dot_lattice_sits_at_the_same_places_of_every_owl3_tiny_patch():
    """4 dots per 7-px patch of the 56-px image the Owl3 tiny encoder sees (2 × 2 px at 112), the same
    positions in every patch, so one patch-embedding filter can read them anywhere."""
    from owl_lab.synth.shapes import dot_lattice

    small = dot_lattice(56).reshape(8, 7, 8, 7).transpose(0, 2, 1, 3)  # [8, 8, 7, 7] per patch
    assert (small.sum((2, 3)) == 4).all() and (small == small[0, 0]).all()
    native = dot_lattice(112)
    assert (native == np.kron(dot_lattice(56), np.ones((2, 2), dtype=bool))).all()


def test_dot_tints_are_far_apart_dark_and_far_from_every_object_tone():
    """The code is absolute: a tint is ≥ 35 (L2) from every other label's tint and ≥ 45 from every tone an
    object can have (c, c ± PATTERN_DELTA), so reading it needs no knowledge of the object's colour. The
    offsets of mode "objects" are 12 apart and relative to the colour. Object colours stay readable: the
    mean of an object's pixels, dots included, stays nearest to its own colour."""
    import itertools

    from owl_lab.synth.shapes import OBJECT_DOT_TINTS, PATTERN_DELTA, RGB, Obj, Scene

    tints = np.asarray(OBJECT_DOT_TINTS)
    assert len(set(OBJECT_DOT_TINTS)) == len(tints)
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(tints, 2)) >= 35
    tones = np.array([np.asarray(c) + d for c in RGB.values() for d in (-PATTERN_DELTA, 0, PATTERN_DELTA)])
    assert np.linalg.norm(tints[:, None] - tones[None], axis=-1).min() >= 45
    assert np.linalg.norm(tints - np.asarray(BACKGROUND), axis=-1).min() >= 30
    for color, label in itertools.product(RGB, (1, 2, 30, 64)):
        scene = Scene((Obj("square", color, "large", "striped", 1, 1),))
        image = with_frame_tag(render(scene, 112), label, "dots")
        pixels = np.asarray(image).reshape(-1, 3).astype(float)
        mean = pixels[(pixels != np.asarray(BACKGROUND)).any(-1)].mean(0)
        assert min(RGB, key=lambda c: np.linalg.norm(mean - np.asarray(RGB[c]))) == color


def test_dots_mode_find_prompts_carry_each_slot_label_tint():
    from owl_lab.synth.shapes import OBJECT_DOT_TINTS, object_dot_tint

    ex = task_find(random.Random(3), render_size=56, binding_n=5, frame_tags="dots", binding_sparse_share=1.0)
    shown = [int(w.rstrip(":")) for w in ex.text.split() if w.endswith(":")]
    for label, im in zip(shown, ex.images, strict=True):
        pixels = {tuple(int(v) for v in p) for p in np.asarray(im).reshape(-1, 3)}
        assert _background_color(im) == BACKGROUND
        assert object_dot_tint(label) in pixels and len(pixels & set(OBJECT_DOT_TINTS)) == 1


def test_dots_recipe_loads_with_the_dots_world():
    from owl_lab.recipes import load_recipe

    recipe = load_recipe("owl3-bind-tags4")
    assert recipe["world"]["frame_tags"] == "dots" and recipe["ship"] is False
    assert recipe["stages"] == load_recipe("owl3-bind-tags3")["stages"]


def test_turns_recipe_uses_the_official_rotary_base_multi_turn_binding_and_n_phases():
    from owl_lab.recipes import load_recipe

    recipe = load_recipe("owl3-bind-turns")
    assert recipe["config"]["rope_theta"] == 1e6 and recipe["ship"] is False
    assert recipe["world"]["frame_tags"] == "dots" and recipe["world"]["binding_turns_per_image"] > 0
    vision, *language = recipe["stages"]
    assert "tags" in vision["objectives"] and vision["tag_weight"] > 1
    phases = [st["world"]["binding_n_choices"] for st in language]
    assert max(phases[-1]) == 50 and all(
        max(a) <= max(b) for a, b in zip(phases[:-1], phases[1:], strict=True)
    )


def test_lineage_recipe_runs_the_label_curriculum_after_the_base_stages():
    from owl_lab.recipes import load_recipe

    base, lineage = load_recipe("owl3-bind-base"), load_recipe("owl3-bind-lineage")
    assert lineage["ship"] is False and lineage["config"]["rope_theta"] == 1e6
    assert lineage["stages"][:3] == base["stages"][:3]  # vision + the two language stages, unchanged
    phases = [st["world"] for st in lineage["stages"][3:]]
    assert phases[0]["binding_find_share"] == 1.0 and max(phases[0]["binding_n_choices"]) <= 3
    assert all(p.get("binding_echo_share", 0) > 0 and p.get("binding_hard_share", 0) > 0 for p in phases[1:])
    assert max(phases[-1]["binding_n_choices"]) == 50
