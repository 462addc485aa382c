"""The device-placement planner and `--device-map` parsing: pure, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.placement import (
    DeviceBudget,
    PartSizes,
    Placement,
    PlacementError,
    load_device_map,
    parse_device_map,
    plan_auto,
    single_device,
)

MIB = 1 << 20
GIB = 1 << 30


def sizes(layers: int = 4, layer: int = 100 * MIB, *, embed: int = 50 * MIB, lm_head: int = 50 * MIB,
          norm: int = 8 * 1024, tied: bool = False) -> PartSizes:
    return PartSizes(embed=embed, layers=[layer] * layers, norm=norm, lm_head=0 if tied else lm_head, tied=tied)


# --- plan_auto -------------------------------------------------------------------------------


def test_everything_on_one_device_when_it_fits() -> None:
    s = sizes()
    placement = plan_auto(s, [DeviceBudget("cuda:0", 8 * GIB), DeviceBudget("cuda:1", 8 * GIB)])
    assert placement == single_device("cuda:0", 4)
    assert placement.devices() == ["cuda:0"]
    assert placement.boundaries() == []


def test_spills_across_two_devices_with_contiguous_layers() -> None:
    # 32 x 400 MiB layers on two 8 GiB cards: 7.2 GiB usable each.
    s = sizes(32, 400 * MIB, embed=500 * MIB, lm_head=500 * MIB)
    placement = plan_auto(s, [DeviceBudget("cuda:0", 8 * GIB), DeviceBudget("cuda:1", 8 * GIB)])
    # cuda:0: 7372.8 MiB usable - 500 embed = 17 layers; the other 15 plus norm and lm_head on cuda:1.
    assert placement.layers == ("cuda:0",) * 17 + ("cuda:1",) * 15
    assert (placement.embed, placement.norm, placement.lm_head) == ("cuda:0", "cuda:1", "cuda:1")
    assert placement.boundaries() == [17]
    assert placement.devices() == ["cuda:0", "cuda:1"]
    used = placement.bytes_per_device(s)
    assert all(used[d] <= 8 * GIB * 0.9 for d in used)


def test_spills_across_three_devices_in_the_order_given() -> None:
    s = sizes(10, GIB, embed=GIB, lm_head=GIB)
    devices = [DeviceBudget("cuda:1", 5 * GIB), DeviceBudget("cuda:0", 5 * GIB), DeviceBudget("cpu", 100 * GIB)]
    placement = plan_auto(s, devices, headroom=0.0)
    assert placement.layers == ("cuda:1",) * 4 + ("cuda:0",) * 5 + ("cpu",)
    assert placement.boundaries() == [4, 9]
    assert placement.devices() == ["cuda:1", "cuda:0", "cpu"]
    assert (placement.norm, placement.lm_head) == ("cpu", "cpu")


def test_layer_zero_is_a_boundary_when_the_embedding_fills_the_first_device() -> None:
    s = sizes(2, GIB, embed=GIB, tied=True)
    placement = plan_auto(s, [DeviceBudget("cuda:0", GIB), DeviceBudget("cpu", 10 * GIB)], headroom=0.0)
    assert placement.layers == ("cpu", "cpu")
    assert placement.boundaries() == [0]


def test_headroom_is_exact_at_the_edge() -> None:
    free = 10 * GIB  # 90% is exactly 9 GiB
    fits = PartSizes(embed=GIB, layers=[4 * GIB, 4 * GIB - 8], norm=8, lm_head=0, tied=True)
    assert fits.total == 9 * GIB
    assert plan_auto(fits, [DeviceBudget("cuda:0", free)]).devices() == ["cuda:0"]
    over = PartSizes(embed=GIB, layers=[4 * GIB, 4 * GIB - 7], norm=8, lm_head=0, tied=True)
    with pytest.raises(PlacementError, match="GiB missing"):
        plan_auto(over, [DeviceBudget("cuda:0", free)])


def test_tied_lm_head_stays_with_the_embedding() -> None:
    s = sizes(8, GIB, embed=GIB, tied=True)
    placement = plan_auto(s, [DeviceBudget("cuda:0", 5 * GIB), DeviceBudget("cuda:1", 10 * GIB)], headroom=0.0)
    assert placement.embed == placement.lm_head == "cuda:0"
    assert placement.norm == placement.layers[-1] == "cuda:1"


def test_untied_lm_head_goes_with_the_last_layer() -> None:
    s = sizes(8, GIB, embed=GIB, lm_head=GIB)
    placement = plan_auto(s, [DeviceBudget("cuda:0", 5 * GIB), DeviceBudget("cuda:1", 10 * GIB)], headroom=0.0)
    assert placement.embed == "cuda:0"
    assert placement.norm == placement.lm_head == placement.layers[-1] == "cuda:1"


def test_norm_and_lm_head_move_the_last_layer_rather_than_add_a_boundary() -> None:
    # The last layer fits on cuda:0 alone but not with lm_head: all three go to cuda:1 together.
    s = PartSizes(embed=GIB, layers=[GIB, GIB], norm=0, lm_head=GIB, tied=False)
    placement = plan_auto(s, [DeviceBudget("cuda:0", 3 * GIB), DeviceBudget("cuda:1", 3 * GIB)], headroom=0.0)
    assert placement.layers == ("cuda:0", "cuda:1")
    assert placement.lm_head == placement.norm == "cuda:1" and placement.boundaries() == [1]


def test_not_enough_memory_says_needed_usable_and_missing() -> None:
    # 32 x 400 MiB + 1000 MiB of embedding and lm_head = 13.48 GiB; two cards with 7 GiB free.
    s = sizes(32, 400 * MIB, embed=500 * MIB, lm_head=500 * MIB)
    with pytest.raises(PlacementError) as info:
        plan_auto(s, [DeviceBudget("cuda:0", 7 * GIB), DeviceBudget("cuda:1", 7 * GIB)])
    assert str(info.value) == (
        "the model needs 13.48 GiB but the devices offer 12.60 GiB usable "
        "(cuda:0 6.30, cuda:1 6.30 after 10% headroom): 0.88 GiB missing"
    )


def test_a_part_larger_than_any_device() -> None:
    s = PartSizes(embed=GIB, layers=[GIB, 8 * GIB], norm=0, lm_head=0, tied=True)
    with pytest.raises(PlacementError, match=r"model\.layers\.1 alone needs 8\.00 GiB .* cuda:0, offers 7\.20"):
        plan_auto(s, [DeviceBudget("cuda:0", 8 * GIB), DeviceBudget("cuda:1", 8 * GIB)])


def test_embedding_must_fit_on_the_first_device() -> None:
    s = sizes(2, GIB, embed=3 * GIB, tied=True)
    with pytest.raises(PlacementError, match="model.embed_tokens needs 3.00 GiB .* list a larger device first"):
        plan_auto(s, [DeviceBudget("cuda:0", 2 * GIB), DeviceBudget("cpu", 10 * GIB)], headroom=0.0)


def test_no_contiguous_split_is_an_error() -> None:
    # 6 GiB in total fits in 2 x 3.5 GiB, but 2 GiB layers leave 1.5 GiB stranded on each device.
    s = PartSizes(embed=0, layers=[2 * GIB] * 3, norm=0, lm_head=0, tied=True)
    with pytest.raises(PlacementError, match=r"model\.layers\.2 needs 2\.00 GiB .* 3\.00 GiB spread"):
        plan_auto(s, [DeviceBudget("cuda:0", 3584 * MIB), DeviceBudget("cuda:1", 3584 * MIB)], headroom=0.0)


@pytest.mark.parametrize("headroom", [-0.1, 1.0])
def test_bad_headroom(headroom: float) -> None:
    with pytest.raises(PlacementError, match="headroom"):
        plan_auto(sizes(), [DeviceBudget("cpu", GIB)], headroom=headroom)


def test_no_devices() -> None:
    with pytest.raises(PlacementError, match="no devices"):
        plan_auto(sizes(), [])


def test_a_device_listed_twice() -> None:
    with pytest.raises(PlacementError, match="listed twice"):
        plan_auto(sizes(), [DeviceBudget("cuda", GIB), DeviceBudget("cuda:0", GIB)])


def test_bad_part_sizes() -> None:
    with pytest.raises(PlacementError, match="no decoder layers"):
        PartSizes(embed=1, layers=[], norm=1, lm_head=1, tied=False)
    with pytest.raises(PlacementError, match="tied"):
        PartSizes(embed=1, layers=[1], norm=1, lm_head=1, tied=True)
    with pytest.raises(PlacementError, match="negative"):
        PartSizes(embed=1, layers=[-1], norm=1, lm_head=1, tied=False)


# --- Placement -------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_bytes_per_device_sums_to_the_total(tied: bool) -> None:
    s = sizes(32, 400 * MIB, embed=500 * MIB, lm_head=500 * MIB, tied=tied)
    placement = plan_auto(s, [DeviceBudget("cuda:0", 5 * GIB), DeviceBudget("cuda:1", 5 * GIB),
                              DeviceBudget("cpu", 64 * GIB)])
    used = placement.bytes_per_device(s)
    assert list(used) == placement.devices() == ["cuda:0", "cuda:1", "cpu"]
    assert sum(used.values()) == s.total


def test_bytes_per_device_rejects_a_layer_count_mismatch() -> None:
    with pytest.raises(PlacementError, match="layers"):
        single_device("cpu", 3).bytes_per_device(sizes(4))


def test_to_json_is_compact() -> None:
    placement = Placement("cuda:0", ("cuda:0",) * 12 + ("cuda:1",) * 17 + ("cpu",), "cpu", "cuda:0")
    assert placement.to_json() == {
        "model.embed_tokens": "cuda:0",
        "model.layers.0-11": "cuda:0",
        "model.layers.12-28": "cuda:1",
        "model.layers.29": "cpu",
        "model.norm": "cpu",
        "lm_head": "cuda:0",
    }


def test_single_device_normalizes_cuda() -> None:
    assert single_device("cuda", 2) == Placement("cuda:0", ("cuda:0", "cuda:0"), "cuda:0", "cuda:0")
    with pytest.raises(PlacementError, match="unknown device 'mps'"):
        single_device("mps", 2)


# --- parse_device_map ------------------------------------------------------------------------


def test_ranges_and_single_keys() -> None:
    raw = {"model.layers.0-3": "cuda:0", "model.layers.4": "cuda:1", "model.layers.5-7": "cpu",
           "model.embed_tokens": "cuda:1", "model.norm": "cuda:0", "lm_head": "cpu"}
    placement = parse_device_map(raw, 8)
    assert placement.layers == ("cuda:0",) * 4 + ("cuda:1",) + ("cpu",) * 3
    assert (placement.embed, placement.norm, placement.lm_head) == ("cuda:1", "cuda:0", "cpu")
    assert placement.boundaries() == [0, 4, 5]


def test_specific_keys_win_over_model_layers() -> None:
    raw = {"model.layers": "cuda:0", "model.layers.6-7": "cpu", "model.layers.2": "cuda:1"}
    placement = parse_device_map(raw, 8)
    assert placement.layers == ("cuda:0", "cuda:0", "cuda:1", "cuda:0", "cuda:0", "cuda:0", "cpu", "cpu")


def test_cuda_means_cuda_0() -> None:
    placement = parse_device_map({"model.layers": "cuda", "lm_head": "cuda:00"}, 2)
    assert placement.devices() == ["cuda:0"]


def test_embed_norm_and_lm_head_default_to_the_first_and_last_layer() -> None:
    placement = parse_device_map({"model.layers.0-1": "cuda:0", "model.layers.2-3": "cuda:1"}, 4)
    assert (placement.embed, placement.norm, placement.lm_head) == ("cuda:0", "cuda:1", "cuda:1")


def test_tied_lm_head_defaults_to_the_embedding_and_cannot_move() -> None:
    raw = {"model.layers.0-1": "cuda:0", "model.layers.2-3": "cuda:1"}
    assert parse_device_map(raw, 4, tied=True).lm_head == "cuda:0"
    with pytest.raises(PlacementError, match="tied"):
        parse_device_map({**raw, "lm_head": "cuda:1"}, 4, tied=True)


def test_overlapping_keys_are_named() -> None:
    with pytest.raises(PlacementError, match=r"'model\.layers\.0-5' and 'model\.layers\.4-7' both place model\.layers\.4"):
        parse_device_map({"model.layers.0-5": "cuda:0", "model.layers.4-7": "cuda:1"}, 8)
    with pytest.raises(PlacementError, match=r"'model\.layers\.0-5' and 'model\.layers\.3'"):
        parse_device_map({"model.layers.0-5": "cuda:0", "model.layers.3": "cuda:1"}, 8)


def test_uncovered_layers_are_named() -> None:
    with pytest.raises(PlacementError, match=r"no device for model\.layers\.3, model\.layers\.6-7"):
        parse_device_map({"model.layers.0-2": "cuda:0", "model.layers.4-5": "cuda:1"}, 8)


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("model.layers.5-2", r"bad layer range 'model\.layers\.5-2': 5 > 2"),
        ("model.layers.0-8", r"'model\.layers\.0-8' is out of range: the model has layers 0-7"),
        ("model.layers.8", r"'model\.layers\.8' is out of range"),
        ("model.layers.a-b", r"bad layer key 'model\.layers\.a-b'"),
        ("model.layers.-1", r"bad layer key 'model\.layers\.-1'"),
        ("model.layers.1-", r"bad layer key"),
        ("model.embed", r"unknown key 'model\.embed'"),
        ("transformer.h.0", r"unknown key 'transformer\.h\.0'"),
    ],
)
def test_bad_keys_are_named(key: str, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        parse_device_map({"model.layers": "cpu", key: "cpu"}, 8)


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CUDA", "", 0, None])
def test_bad_devices_are_named(value: object) -> None:
    with pytest.raises(PlacementError, match=r"'model\.norm': unknown device"):
        parse_device_map({"model.layers": "cpu", "model.norm": value}, 2)  # type: ignore[dict-item]


def test_unavailable_device() -> None:
    raw = {"model.layers.0": "cuda:0", "model.layers.1": "cuda:2"}
    assert parse_device_map(raw, 2, available=["cuda", "cuda:2"]).devices() == ["cuda:0", "cuda:2"]
    with pytest.raises(PlacementError, match=r"'model\.layers\.1': device 'cuda:2' is not available \(available: cpu, cuda:0\)"):
        parse_device_map(raw, 2, available=["cpu", "cuda:0"])


def test_not_an_object() -> None:
    with pytest.raises(PlacementError, match="object"):
        parse_device_map(["cpu"], 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "placement",
    [
        single_device("cpu", 3),
        Placement("cuda:0", ("cuda:0",) * 12 + ("cuda:1",) * 18, "cuda:1", "cuda:1"),
        Placement("cpu", ("cuda:0", "cpu", "cuda:0", "cuda:1"), "cuda:0", "cpu"),
    ],
)
def test_to_json_round_trips(placement: Placement) -> None:
    as_json = json.loads(json.dumps(placement.to_json()))
    assert parse_device_map(as_json, len(placement.layers)) == placement


def test_auto_plan_round_trips() -> None:
    s = sizes(32, 400 * MIB, embed=500 * MIB, lm_head=500 * MIB, tied=True)
    placement = plan_auto(s, [DeviceBudget("cuda:0", 4 * GIB), DeviceBudget("cuda:1", 4 * GIB),
                              DeviceBudget("cpu", 64 * GIB)])
    assert parse_device_map(placement.to_json(), 32, tied=True) == placement


# --- load_device_map -------------------------------------------------------------------------


def test_load_auto_is_none() -> None:
    assert load_device_map("auto", 4) is None


def test_load_a_single_device() -> None:
    assert load_device_map("cpu", 4) == single_device("cpu", 4)
    assert load_device_map("cuda", 4) == single_device("cuda:0", 4)
    assert load_device_map("cuda:1", 4, available=["cpu", "cuda:0", "cuda:1"]) == single_device("cuda:1", 4)
    with pytest.raises(PlacementError, match="'cuda:1' is not available"):
        load_device_map("cuda:1", 4, available=["cpu", "cuda:0"])


def test_load_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.layers.0-1": "cuda", "model.layers.2-3": "cpu"}))
    placement = load_device_map(str(path), 4)
    assert placement == Placement("cuda:0", ("cuda:0", "cuda:0", "cpu", "cpu"), "cpu", "cpu")


def test_load_names_the_file_in_map_errors(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.layers.0-1": "cuda"}))
    with pytest.raises(PlacementError, match=rf"device map {path}: no device for model\.layers\.2-3"):
        load_device_map(str(path), 4)


def test_load_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlacementError, match="not auto, cpu, cuda, cuda:N or an existing JSON file"):
        load_device_map(str(tmp_path / "nope.json"), 4)


def test_load_a_json_list(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text('["cuda:0", "cuda:1"]')
    with pytest.raises(PlacementError, match="expected a JSON object .* got an array"):
        load_device_map(str(path), 4)


def test_load_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text("{model.layers: cpu}")
    with pytest.raises(PlacementError, match="cannot read JSON"):
        load_device_map(str(path), 4)
