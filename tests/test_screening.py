"""Poisoning defences for field labels: near-duplicates, outlier labellers and share caps."""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from fractions import Fraction

import cv2
import numpy as np
import pytest

from trainer.data.phash import dhash, hamming
from trainer.data.screening import FieldLabel, ScreenRules, screen_field


def _scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(
        rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), (64, 48), interpolation=cv2.INTER_CUBIC
    )


def _label(
    i: int,
    *,
    device: str = "cam-1",
    labeller: str = "alice",
    label: str = "circle",
    scene: int | None = None,
    predicted: str | None = None,
    confidence: float | None = None,
) -> FieldLabel:
    return FieldLabel(
        i,
        device,
        labeller,
        label,
        float(i),
        dhash(_scene(i if scene is None else scene)),
        predicted,
        confidence,
    )


def test_dhash_survives_re_encoding_and_brightening_but_not_another_scene() -> None:
    img = _scene(1)
    ok, buf = cv2.imencode(
        ".jpg", cv2.convertScaleAbs(img, alpha=1.0, beta=12), [cv2.IMWRITE_JPEG_QUALITY, 60]
    )
    assert ok
    again = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    assert hamming(dhash(img), dhash(cv2.resize(again, (128, 96)))) <= 4
    assert min(hamming(dhash(img), dhash(_scene(s))) for s in range(2, 30)) > 8


def test_near_duplicates_are_dropped_and_relabelled_copies_held_for_review() -> None:
    items = [
        _label(1, scene=100),
        _label(2, scene=100),  # the same scene again, same label: one copy is enough
        _label(3, scene=200, label="square"),
        _label(4, scene=200, label="circle", labeller="mallory"),  # the same scene, relabelled
        _label(5, scene=300),
    ]
    r = screen_field(items, base_size=1000, rules=ScreenRules())
    assert r.kept == [1, 5]
    assert r.dropped[2].startswith("near_duplicate: of sample 1")
    assert set(r.review) == {3, 4} and r.review[4].startswith("conflicting_duplicate")


def test_a_labeller_who_contradicts_confident_predictions_is_held_for_review() -> None:
    honest = [
        _label(
            i,
            labeller=f"h{i % 3}",
            predicted="circle",
            confidence=0.97,
            label="circle" if i % 10 else "square",
        )
        for i in range(60)
    ]
    hostile = [
        _label(100 + i, labeller="mallory", predicted="circle", confidence=0.97, label="square")
        for i in range(12)
    ]
    unsure = [
        _label(200 + i, labeller="mallory", predicted="circle", confidence=0.5, label="square")
        for i in range(3)
    ]
    r = screen_field(honest + hostile + unsure, base_size=10_000, rules=ScreenRules())
    assert r.disagreement["mallory"] == 1.0 and r.disagreement["h1"] < 0.2
    assert {i for i, why in r.review.items() if why.startswith("labeller_outlier: mallory")} == {
        *range(100, 112),
        *range(200, 203),
    }
    assert not set(r.kept) & set(r.review) and len(r.kept) == 60


def test_a_sole_labeller_who_contradicts_the_champions_confident_predictions_is_held() -> None:
    """With no other labeller to compare with, the champion's own expected error (1 - confidence) is the
    yardstick: a sole labeller contradicting 97%-confident predictions on every sample is held, a sole
    honest one disagreeing on one in ten is not."""
    hostile = [
        _label(i, labeller="mallory", predicted="circle", confidence=0.97, label="square") for i in range(12)
    ]
    r = screen_field(hostile, base_size=10_000, rules=ScreenRules())
    assert r.kept == [] and set(r.review) == set(range(12))
    assert (
        r.review[0] == "labeller_outlier: mallory disagrees with confident predictions on 100% (expected 3%)"
    )
    assert r.expected_disagreement["mallory"] == pytest.approx(0.03)
    honest = [
        _label(
            i,
            labeller="alice",
            predicted="circle",
            confidence=0.95,
            label="square" if i % 10 == 0 else "circle",
        )
        for i in range(40)
    ]
    r = screen_field(honest, base_size=10_000, rules=ScreenRules())
    assert r.review == {} and len(r.kept) == 40 and r.disagreement["alice"] == pytest.approx(0.1)


def test_labellers_who_all_correct_a_confidently_wrong_champion_are_not_held() -> None:
    """Under drift the champion can be confidently wrong for everyone: with peers to compare with, honest
    labellers who all correct it are not singled out (the champion is the yardstick only for a sole one)."""
    items = [
        _label(
            i,
            labeller=f"h{i % 2}",
            predicted="circle",
            confidence=0.95,
            label="square" if i % 5 else "circle",
        )
        for i in range(40)
    ]
    r = screen_field(items, base_size=10_000, rules=ScreenRules())
    assert r.disagreement == {"h0": pytest.approx(0.8), "h1": pytest.approx(0.8)}
    assert r.review == {} and len(r.kept) == 40


def _source(i: int, device: str, labeller: str = "bob") -> FieldLabel:
    """A field label with a hash of its own (far from every other: no near-duplicates here)."""
    return FieldLabel(
        i, device, labeller, "circle", float(i), int.from_bytes(hashlib.sha256(b"%d" % i).digest()[:8])
    )


def _singles(start: int, n: int, labeller: str = "bob") -> list[FieldLabel]:
    return [_source(start + i, f"single-{start + i}", labeller) for i in range(n)]


CAP_CASES = {
    # 100 original images, 1,000 from one device (the audit's probe: 275 kept = 73% before the fix)
    "one dominant device": (
        100,
        [_source(i, "noisy", f"l{i % 5}") for i in range(1000)] + _singles(5000, 20),
        ScreenRules(max_device_share=0.25, max_labeller_share=1),
        {"noisy": 40},  # k <= 25% of (100 + 20 + k)
    ),
    "two dominant devices": (
        100,
        [_source(i, "a") for i in range(500)]
        + [_source(1000 + i, "b") for i in range(300)]
        + _singles(5000, 10),
        ScreenRules(max_device_share=0.25, max_labeller_share=1),
        {"a": 55, "b": 55},  # x <= 25% of (100 + 10 + 2x)
    ),
    "one flooding labeller": (
        50,
        [_source(i, f"dev-{i % 40}", "mallory") for i in range(400)]
        + [_source(1000 + i, f"other-{i}", f"h{i % 4}") for i in range(40)],
        ScreenRules(max_device_share=1, max_labeller_share=0.3),
        {"mallory": 38},  # k <= 30% of (50 + 40 + k)
    ),
    "a device and a labeller together": (
        200,
        [_source(i, "noisy", "mallory" if i % 2 else "bob") for i in range(300)]
        + [_source(1000 + i, f"dev-{i}", "mallory") for i in range(200)]
        + _singles(5000, 60, "carol"),
        ScreenRules(max_device_share=0.2, max_labeller_share=0.3),
        {},
    ),
    "no original data (the field samples are the whole set)": (
        None,
        [_source(i, "a") for i in range(30)]
        + [_source(100 + i, "b") for i in range(20)]
        + [_source(200 + i, "c") for i in range(10)]
        + [_source(300 + i, "d") for i in range(5)],
        ScreenRules(max_device_share=0.4, max_labeller_share=1),
        {},
    ),
}


@pytest.mark.parametrize("case", list(CAP_CASES))
def test_no_device_or_labeller_exceeds_its_share_of_the_final_training_set(case: str) -> None:
    """On the set actually trained on (original images + the field samples kept), every device and every
    labeller holds at most its share; nothing is dropped that would fit; the same input in another
    order keeps the same samples."""
    base, items, rules, expected = CAP_CASES[case]
    r = screen_field(items, base_size=base, rules=rules)
    kept = [i for i in items if i.sample_id in set(r.kept)]
    total = (base or 0) + len(kept)
    caps = ((lambda i: i.device, rules.max_device_share), (lambda i: i.labeller, rules.max_labeller_share))
    for key, share in caps:
        for source, n in Counter(key(i) for i in kept).items():
            assert Fraction(n, total) <= Fraction(share), (case, source, n, total)
    for source, n in expected.items():
        assert sum(source in (i.device, i.labeller) for i in kept) == n, (case, source)
    capped = [
        i for i in items if r.dropped.get(i.sample_id, "").split(":")[0] in ("device_cap", "labeller_cap")
    ]
    assert capped and len(capped) + len(kept) == len(items), case
    for i in capped:  # added back, it would break its device's or its labeller's share
        assert any(
            Fraction(sum(key(k) == key(i) for k in kept) + 1, total + 1) > Fraction(share)
            for key, share in caps
        ), (case, i)
    shuffled = random.Random(7).sample(items, len(items))
    assert screen_field(shuffled, base_size=base, rules=rules).kept == r.kept


def test_a_capped_source_keeps_a_seeded_draw_of_its_samples_with_the_reason_of_each_drop() -> None:
    base, items, rules, _ = CAP_CASES["one dominant device"]
    r = screen_field(items, base_size=base, rules=rules)
    noisy = [i for i in r.kept if i < 1000]
    assert min(noisy) < 250 and max(noisy) > 750  # spread over the whole period, not its first burst
    assert r.dropped[next(i for i in range(1000) if i not in noisy)] == (
        "device_cap: noisy keeps 40 of 1000 (at most 25% of the 160 images trained on)"
    )
    again = screen_field(items, base_size=base, rules=rules.model_copy(update={"seed": 1}))
    assert len(again.kept) == len(r.kept) and again.kept != r.kept
    assert r.summary()["dropped"] == {"device_cap": 960}


def _jpeg(seed: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", _scene(seed))
    assert ok
    return buf.tobytes()


def test_field_dataset_screens_the_labels_and_records_their_provenance(tmp_path) -> None:
    """Through the store: a flooding device is capped, a re-sent scene dropped, a relabelled copy held,
    and each kept field image names its sample, device, labeller and labelling time in the manifest."""
    from trainer.fleet.labelling import field_dataset
    from trainer.store import Store

    labels = ["circle", "square", "triangle"]
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:

        def add(device: str, scene: int, label: str, labeller: str, n: int) -> int:
            sid = store.add_sample(
                fleet="f", device=device, ts=float(n), consent_policy="c", sha256=f"{n:064x}", image=_jpeg(scene),
                provenance={"reason": "drift", "top": [[0, 0.6]]},
            )  # fmt: skip
            assert sid is not None
            store.add_label(sid, label, source="human", labeller=labeller)
            return sid

        flood = [add("noisy", 1000 + i, "circle", "alice", i) for i in range(30)]
        a = add("cam-1", 1, "square", "bob", 100)
        dup = add("cam-2", 1, "square", "bob", 101)  # the same scene from another camera
        b = add("cam-3", 2, "square", "bob", 102)
        relabelled = add("cam-4", 2, "triangle", "eve", 103)
        field = field_dataset(
            store, labels, base_size=60, rules=ScreenRules(max_device_share=0.1, max_labeller_share=1)
        )
    r = field.screen
    assert r.dropped[dup].startswith("near_duplicate") and {b, relabelled} <= set(r.review)
    assert field.devices == {
        "noisy": 6,
        "cam-1": 1,
    }  # k <= 10% of (60 + 1 + k): 6 of the 67 images trained on
    assert len([i for i in r.kept if i in flood]) == 6 and a in r.kept
    entries = field.dataset.manifest().entries
    prov = {e.provenance["sample_id"]: e.provenance for e in entries}
    assert prov[str(a)] == {
        "sample_id": str(a),
        "device": "cam-1",
        "labeller": "bob",
        "labelled_at": prov[str(a)]["labelled_at"],
    }
    assert all(e.meta == {"origin": "field", "device": e.provenance["device"]} for e in entries)


def test_the_training_set_diff_names_what_was_added_per_device_and_class() -> None:
    from trainer.data.dataset import DatasetManifest, ManifestEntry

    def entry(i: int, label: str, device: str | None = None, labeller: str | None = None) -> ManifestEntry:
        return ManifestEntry(
            sha256=f"{i:064x}", label=label, split="train", source=f"field:{device}" if device else "builtin",
            licence="c", meta={"device": device} if device else {}, provenance={"labeller": labeller} if labeller else {},
        )  # fmt: skip

    base = [entry(i, "circle") for i in range(5)]
    before = DatasetManifest(
        origin="a", labels=["circle", "square"], split_fractions=(0.7, 0.15, 0.15), entries=base
    )
    now = before.model_copy(
        update={
            "entries": base[1:]
            + [
                entry(10, "square", "cam-1", "bob"),
                entry(11, "square", "cam-1", "bob"),
                entry(12, "circle", "cam-2", "eve"),
            ]
        }
    )
    assert now.added_since(before) == {
        "images": 3,
        "removed": 1,
        "by_device": {"cam-1": {"square": 2}, "cam-2": {"circle": 1}},
        "labellers": {"bob": 2, "eve": 1},
    }


def _card_tables(html: str) -> list[list[list[str]]]:
    """Each table of an HTML fragment as rows of cell texts (header row first)."""
    return [
        [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]
        for table in re.findall(r"<table>(.*?)</table>", html)
    ]


def test_the_model_card_shows_what_a_retraining_added_per_device_class_and_labeller(
    shapes_package, shapes_dataset, feature_cache, small_train_config, tmp_path
) -> None:
    """A candidate trained on the original data plus screened field samples, against the champion: its
    evaluation and its card's "Added since the champion" section count the field images per device and
    class and per labeller, and nothing of the original data as added or removed."""
    from trainer.build import train_package
    from trainer.evaluation.gate import GateRules
    from trainer.fleet.labelling import field_dataset
    from trainer.store import Store

    labels = shapes_dataset.labels
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        for n, (device, label, labeller) in enumerate(
            [("cam-1", "square", "bob")] * 3 + [("cam-1", "circle", "eve")] + [("cam-2", "star", "eve")] * 2
        ):
            sid = store.add_sample(
                fleet="f", device=device, ts=float(n), consent_policy="c", sha256=f"{n:064x}",
                image=_jpeg(500 + n), provenance={"reason": "drift", "top": [[0, 0.5]]},
            )  # fmt: skip
            assert sid is not None
            store.add_label(sid, label, source="human", labeller=labeller)
        field = field_dataset(store, labels, base_size=len(shapes_dataset.samples))
    assert len(field.dataset.samples) == 6, field.screen.summary()
    no_rules = GateRules(max_ece=None, max_int8_drop=None, max_accuracy_drop=None, max_slice_drop=None)
    cfg = small_train_config(
        feature_cache=str(feature_cache),
        formats=["onnx-fp32", "onnx-int8"],
        robustness={"enabled": False},
        gate=no_rules,
        version="2.0.0",
    )
    result = train_package(
        shapes_dataset.combine(field.dataset), tmp_path / "v2", cfg, champion=shapes_package.package.root
    )
    by_device = {"cam-1": {"square": 3, "circle": 1}, "cam-2": {"star": 2}}
    assert result.evaluation.dataset["added_since_champion"] == {
        "champion": "shapes 1.0.0",
        "images": 6,
        "removed": 0,
        "by_device": by_device,
        "labellers": {"bob": 3, "eve": 3},
    }
    card = (result.package.root / "card.html").read_text()
    section = card[card.index("<h3>Added since the champion (shapes 1.0.0)</h3>") :]
    assert section.split("</h3>", 1)[1].lstrip().startswith("<p>6 images added, 0 removed.</p>")
    devices, labellers = _card_tables(section)[:2]
    assert devices[0] == ["device / source", *labels, "total"]
    shown = {row[0]: dict(zip([*labels, "total"], map(int, row[1:]))) for row in devices[1:]}
    assert shown == {
        dev: {**{lab: per.get(lab, 0) for lab in labels}, "total": sum(per.values())}
        for dev, per in by_device.items()
    }
    assert labellers == [["labeller", "labels"], ["bob", "3"], ["eve", "3"]]
