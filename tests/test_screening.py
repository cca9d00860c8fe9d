"""Poisoning defences for field labels: near-duplicates, outlier labellers and share caps."""

from __future__ import annotations

import cv2
import numpy as np

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


def test_no_device_or_labeller_exceeds_its_share_of_the_training_set() -> None:
    flood = [_label(i, device="noisy") for i in range(80)]
    others = [_label(100 + i, device=f"cam-{i}", labeller="bob") for i in range(10)]
    r = screen_field(
        flood + others, base_size=110, rules=ScreenRules(max_device_share=0.2, max_labeller_share=0.9)
    )
    kept_noisy = [i for i in r.kept if i < 100]
    assert kept_noisy == list(range(40))  # 20% of 200 images, the oldest first
    assert all(r.dropped[i].startswith("device_cap: noisy") for i in range(40, 80))
    assert all(100 + i in r.kept for i in range(10))
    assert r.summary()["dropped"] == {"device_cap": 40}


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
    assert field.devices == {"noisy": 9, "cam-1": 1}  # 10% of 60 + 31 images
    assert [i for i in r.kept if i in flood] == flood[:9] and a in r.kept
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
