"""Time estimates: node costs, learned run times, and a running job's progress."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cylindria.core.estimates import (
    JOB_OVERHEAD,
    NodeCost,
    RunTimes,
    Timeline,
    models_of,
    node_costs,
)

MEGA = 1024 * 1024 / 1e6

# Seconds each node of txt2img() takes in the fake runs: the sampler is 90% of the job.
SECONDS = {"4": 0.4, "6": 0.05, "7": 0.05, "5": 0.0, "3": 9.0, "8": 0.3, "9": 0.2}
ORDER = ["4", "6", "7", "5", "3", "8", "9"]


def txt2img(steps: int = 20, width: int = 1024, height: int = 1024,
            batch: int = 2) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse",
                                                         "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": width, "height": height, "batch_size": batch}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0],
                                                    "filename_prefix": "t2i"}},
    }


def run(timeline: Timeline, start: float = 0.0, steps: int = 20) -> float:
    """Feed a whole successful txt2img run as ComfyUI sends it; the clock at its end."""
    now = start
    timeline.started(now)
    timeline.cached([])
    for node in ORDER:
        timeline.executing(node, now)
        if node == "3":
            for step in range(1, steps + 1):
                timeline.progress(node, step, steps, now + SECONDS[node] * step / steps)
        now += SECONDS[node]
    timeline.finished(now, success=True)
    timeline.executing(None, now)
    return now


def learned(gpu: int = 0) -> RunTimes:
    times = RunTimes()
    run(Timeline(gpu, node_costs(txt2img()), times))
    return times


# -- node costs ---------------------------------------------------------------------------

def test_txt2img_costs_follow_steps_size_and_batch():
    costs = node_costs(txt2img())
    assert set(costs) == set(ORDER)
    assert costs["3"].key == "KSampler"
    assert costs["3"].steps == 20
    assert costs["3"].units == pytest.approx(20 * MEGA * 2)
    assert costs["8"] == NodeCost("VAEDecode", pytest.approx(MEGA * 2), None)
    assert costs["4"] == NodeCost("CheckpointLoaderSimple", 1.0, None)
    assert costs["9"] == NodeCost("SaveImage", 1.0, None)


def test_the_envelope_gives_the_same_costs():
    assert node_costs({"prompt": txt2img(), "extra_data": {}}) == node_costs(txt2img())


def test_a_second_pass_after_latent_upscale_by_works_on_the_larger_latent():
    workflow = txt2img(width=512, height=512, batch=1)
    workflow["10"] = {"class_type": "LatentUpscaleBy",
                      "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                 "scale_by": 2.0}}
    workflow["11"] = {"class_type": "KSampler", "inputs": {
        **workflow["3"]["inputs"], "steps": 10, "denoise": 0.5, "latent_image": ["10", 0]}}
    workflow["8"]["inputs"]["samples"] = ["11", 0]
    costs = node_costs(workflow)
    assert costs["3"].units == pytest.approx(20 * MEGA / 4)
    assert costs["11"].units == pytest.approx(10 * MEGA)
    assert costs["11"].steps == 10
    assert costs["8"].units == pytest.approx(MEGA)


def test_latent_upscale_keeps_the_aspect_for_a_side_left_at_zero_and_repeat_multiplies():
    workflow = txt2img(width=512, height=256, batch=1)
    workflow["10"] = {"class_type": "LatentUpscale", "inputs": {
        "samples": ["5", 0], "upscale_method": "bilinear", "width": 1024, "height": 0,
        "crop": "disabled"}}
    workflow["11"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["10", 0],
                                                                     "amount": 3}}
    workflow["3"]["inputs"]["latent_image"] = ["11", 0]
    assert node_costs(workflow)["3"].units == pytest.approx(20 * 1024 * 512 * 3 / 1e6)


def test_ksampler_advanced_runs_only_its_share_of_the_steps():
    workflow = txt2img(batch=1)
    workflow["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **workflow["3"]["inputs"], "steps": 30, "start_at_step": 10, "end_at_step": 10000}}
    assert node_costs(workflow)["3"].steps == 20
    workflow["3"]["inputs"].update(start_at_step=5, end_at_step=12)
    assert node_costs(workflow)["3"].steps == 7
    workflow["3"]["inputs"].update(start_at_step=40)
    assert node_costs(workflow)["3"] == NodeCost("KSamplerAdvanced", 0.0, None)


def test_custom_samplers_take_their_steps_from_the_scheduler():
    workflow = {
        "1": {"class_type": "EmptySD3LatentImage",
              "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "2": {"class_type": "BasicScheduler",
              "inputs": {"model": ["9", 0], "scheduler": "simple", "steps": 28,
                         "denoise": 1.0}},
        "3": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["2", 0], "step": 8}},
        "4": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["9", 1], "guider": ["9", 2], "sampler": ["9", 3],
            "sigmas": ["3", 1], "latent_image": ["1", 0]}},
        "5": {"class_type": "SamplerCustom", "inputs": {
            "model": ["9", 0], "sigmas": ["2", 0], "latent_image": ["1", 0]}},
    }
    costs = node_costs(workflow)
    assert costs["4"].steps == 20
    assert costs["4"].units == pytest.approx(20 * MEGA)
    assert costs["5"].steps == 28


def test_video_latents_count_their_frames_and_unknown_sizes_count_one_megapixel():
    workflow = {
        "1": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 848, "height": 480, "length": 25, "batch_size": 1}},
        "2": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["9", 0]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["9", 0]}},
        "5": {"class_type": "ImageScale", "inputs": {
            "image": ["3", 0], "upscale_method": "lanczos", "width": 640, "height": 480,
            "crop": "disabled"}},
        "6": {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["9", 0]}},
    }
    costs = node_costs(workflow)
    assert costs["2"].units == pytest.approx(848 * 480 * 25 / 1e6)
    assert costs["4"].units == 1.0
    assert costs["6"].units == pytest.approx(640 * 480 / 1e6)


def test_odd_graphs_fall_back_to_one_unit():
    workflow = {
        "1": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["2", 0],
                                                           "scale_by": 2}},
        "2": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["1", 0],
                                                           "scale_by": "x"}},
        "3": {"class_type": "KSampler", "inputs": {"steps": "20", "latent_image": ["1", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["404", 0]}},
        "5": {"class_type": "KSampler", "inputs": {"steps": [1], "latent_image": "no"}},
        "6": "not a node",
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": float("nan"),
                                                            "height": 1e400}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 1e-200, "height": 1e-200}},
        "10": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["9", 0],
                                                                   "megapixels": 1.0}},
        "11": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["15", 0],
                                                            "scale_by": 1e-300}},
        "12": {"class_type": "LatentUpscale", "inputs": {"samples": ["11", 0], "width": 8,
                                                          "height": 0}},
        "13": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0]}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0]}},
        "15": {"class_type": "EmptyLatentImage", "inputs": {"width": 1e-100,
                                                             "height": 1e-100}},
    }
    costs = node_costs(workflow)
    assert "6" not in costs
    assert costs["3"] == NodeCost("KSampler", 20.0, 20)
    assert costs["4"].units == 1.0
    assert costs["5"] == NodeCost("KSampler", 1.0, None)
    assert costs["8"].units == costs["13"].units == costs["14"].units == 1.0
    assert node_costs("junk") == {}  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=8)
node_ids = st.sampled_from(["1", "2", "3", "4", "5"])
links = st.tuples(node_ids, st.integers(-1, 2)).map(list)
class_types = st.sampled_from(
    ["KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced", "EmptyLatentImage",
     "EmptyHunyuanLatentVideo", "LatentUpscale", "LatentUpscaleBy", "RepeatLatentBatch",
     "LatentFromBatch", "LatentBatch", "ImageBatch", "VAEDecode", "VAEEncode", "SplitSigmas",
     "BasicScheduler", "ImageScaleToTotalPixels", "LoraLoader", "CheckpointLoaderSimple",
     "Other"])
input_names = st.sampled_from(
    ["samples", "samples2", "latent_image", "pixels", "image", "image2", "sigmas", "steps",
     "start_at_step", "end_at_step", "width", "height", "batch_size", "length", "amount",
     "scale_by", "megapixels", "batch_index", "step", "ckpt_name", "lora_name"])
nodes = st.fixed_dictionaries(
    {"class_type": class_types | json_values,
     "inputs": st.dictionaries(input_names, links | json_values, max_size=6) | json_values})
workflows = st.dictionaries(node_ids | st.text(max_size=3), nodes | json_values, max_size=6)


@settings(max_examples=200, deadline=None)
@given(workflows)
def test_junk_workflows_never_raise(workflow):
    costs = node_costs(workflow)
    for cost in costs.values():
        assert isinstance(cost, NodeCost)
        assert math.isfinite(cost.units) and cost.units >= 0
    assert all(isinstance(name, str) for name in models_of(workflow))
    node_costs({"prompt": workflow})


def test_batches_add_up_and_a_long_chain_is_cheap():
    workflow: dict[str, Any] = {"0": {"class_type": "EmptyLatentImage", "inputs": {
        "width": 1000, "height": 1000, "batch_size": 1}}}
    for n in range(1, 5000):
        workflow[str(n)] = {"class_type": "LatentBatch", "inputs": {
            "samples1": [str(n - 1), 0], "samples2": [str(n - 1), 0]}}
    workflow["a"] = {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0]}}
    workflow["b"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4999", 0]}}
    costs = node_costs(workflow)
    assert costs["a"].units == pytest.approx(2 ** 10)
    assert costs["b"].units == 1.0


# -- models -------------------------------------------------------------------------------

def test_models_of_names_loader_files_only():
    workflow = txt2img()
    workflow["20"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["4", 0], "clip": ["4", 1], "lora_name": "detail.safetensors",
        "strength_model": 1.0, "strength_clip": 1.0}}
    workflow["21"] = {"class_type": "DualCLIPLoader", "inputs": {
        "clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl.safetensors",
        "type": "flux"}}
    workflow["22"] = {"class_type": "UNETLoader", "inputs": {
        "unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}}
    workflow["23"] = {"class_type": "CustomNode", "inputs": {"model_name": "nope.pt"}}
    assert models_of(workflow) == {"sd_xl_base_1.0.safetensors", "detail.safetensors",
                                   "clip_l.safetensors", "t5xxl.safetensors",
                                   "flux1-dev.safetensors"}
    assert "euler" not in models_of(workflow)


# -- learned times ------------------------------------------------------------------------

def test_run_times_average_per_unit_with_the_first_observation_taken_as_is():
    times = RunTimes()
    times.observe(0, "KSampler", 20.0, 10.0)
    assert times.expect(0, "KSampler", 40.0) == pytest.approx(20.0)
    times.observe(0, "KSampler", 20.0, 20.0)
    assert times.expect(0, "KSampler", 20.0) == pytest.approx(10.0 * 0.7 + 20.0 * 0.3)
    assert times.expect(0, "VAEDecode", 1.0) is None


def test_an_unknown_gpu_borrows_the_mean_of_the_gpus_that_know():
    times = RunTimes()
    times.observe(0, "KSampler", 1.0, 2.0)
    times.observe(2, "KSampler", 1.0, 4.0)
    assert times.expect(0, "KSampler", 1.0) == pytest.approx(2.0)
    assert times.expect(1, "KSampler", 1.0) == pytest.approx(3.0)
    assert times.expect(None, "KSampler", 1.0) == pytest.approx(3.0)


def test_version_counts_observations_and_nonsense_is_ignored():
    times = RunTimes()
    times.observe(0, "K", 1.0, 1.0)
    times.observe(0, "K", 1.0, 0.0)
    assert times.version == 2
    for units, seconds in [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (1.0, math.nan),
                           (math.inf, 1.0)]:
        times.observe(0, "K", units, seconds)
    assert times.version == 2
    assert times.expect(0, "K", 1.0) == pytest.approx(0.7)


def test_run_times_stay_bounded_dropping_the_least_recently_updated():
    times = RunTimes(limit=3)
    for key in ["a", "b", "c"]:
        times.observe(0, key, 1.0, 1.0)
    times.observe(0, "a", 1.0, 1.0)
    times.observe(1, "d", 1.0, 1.0)
    assert len(times) == 3
    assert times.expect(0, "b", 1.0) is None
    assert times.expect(0, "a", 1.0) is not None
    assert times.expect(5, "d", 1.0) == 1.0
    big = RunTimes()
    for n in range(10_000):
        big.observe(n % 8, f"k{n}", 1.0, 1.0)
    assert 1000 <= len(big) <= 5000
    assert big.expect(7, "k9999", 1.0) == 1.0


def test_run_times_survive_the_state_file():
    times = RunTimes()
    times.observe(0, "KSampler", 20.0, 9.0)
    times.observe(1, "VAEDecode", 2.0, 0.3)
    back = RunTimes.from_state(json.loads(json.dumps(times.to_state())))
    assert back.to_state() == times.to_state()
    assert back.expect(1, "VAEDecode", 2.0) == pytest.approx(0.3)


def test_from_state_skips_junk():
    data = {"rates": [[0, "K"], ["0", "K", 1.0], [0, 5, 1.0], [0, "K", -1.0],
                      [0, "K", "1.0"], [True, "K", 1.0], [0, "K", None], "x", [0, "K", 10**400],
                      [0, "Good", 2.0]]}
    times = RunTimes.from_state(data)
    assert times.to_state()["rates"] == [[0, "Good", 2.0]]
    for junk in [{}, {"rates": "x"}, {"rates": None}, [], None, "junk"]:
        assert len(RunTimes.from_state(junk)) == 0  # type: ignore[arg-type]


def test_expect_job_needs_most_of_the_job_known():
    costs = node_costs(txt2img())
    times = RunTimes()
    assert times.expect_job(0, costs) is None
    times.observe(0, "CheckpointLoaderSimple", 1.0, 0.4)
    times.observe(0, "SaveImage", 1.0, 0.2)
    # The sampler is most of the units: without it there is no estimate.
    assert times.expect_job(0, costs) is None
    times.observe(0, "KSampler", costs["3"].units, 9.0)
    # Unknown nodes count as the median known one (0.4).
    assert times.expect_job(0, costs) == pytest.approx(0.4 + 0.2 + 9.0 + 4 * 0.4)
    assert times.expect_job(0, costs, skip=["4", "6", "7", "5", "8", "9"]) == \
        pytest.approx(9.0)
    assert times.expect_job(0, costs, skip=ORDER) == 0.0


def test_a_learned_job_is_expected_to_take_what_it_took():
    times = learned()
    assert times.expect_job(0, node_costs(txt2img())) == pytest.approx(sum(SECONDS.values()))
    # Twice the steps of the same size: the sampler takes twice as long.
    assert times.expect_job(0, node_costs(txt2img(steps=40))) == \
        pytest.approx(sum(SECONDS.values()) + 9.0)


# -- a running job --------------------------------------------------------------------------

def test_progress_follows_the_sampler_once_learned():
    times = learned()
    timeline = Timeline(0, node_costs(txt2img()), times)
    now = 100.0
    timeline.started(now)
    for node in ["4", "6", "7", "5"]:
        timeline.executing(node, now)
        now += SECONDS[node]
    timeline.executing("3", now)
    timeline.progress("3", 4, 20, now + 1.8)
    assert 0.2 <= timeline.fraction() <= 0.3
    assert timeline.remaining(now + 1.8) == pytest.approx(9.0 * 16 / 20 + 0.5)


def test_with_nothing_learned_progress_counts_nodes_and_no_time_is_told():
    timeline = Timeline(0, node_costs(txt2img()), RunTimes())
    timeline.started(0.0)
    for node in ["4", "6", "7", "5"]:
        timeline.executing(node, 0.0)
    timeline.executing("3", 0.0)
    timeline.progress("3", 10, 20, 1.0)
    assert timeline.fraction() == pytest.approx(4.5 / 7)
    assert timeline.remaining(1.0) is None


def test_fraction_reaches_one_only_after_success():
    timeline = Timeline(0, node_costs(txt2img()), learned())
    fractions = []
    now = 0.0
    timeline.started(now)
    for node in ORDER:
        timeline.executing(node, now)
        now += SECONDS[node]
        fractions.append(timeline.fraction())
    timeline.executing(None, now)
    assert timeline.fraction() == 0.99
    assert max(fractions) < 1.0
    timeline.finished(now, success=True)
    assert timeline.fraction() == 1.0


def test_a_failed_job_stays_below_one_and_its_last_node_is_not_learned():
    times = RunTimes()
    timeline = Timeline(0, node_costs(txt2img()), times)
    timeline.started(0.0)
    timeline.executing("4", 0.0)
    timeline.executing("3", 1.0)
    timeline.finished(50.0, success=False)
    assert timeline.fraction() < 1.0
    assert times.expect(0, "CheckpointLoaderSimple", 1.0) == pytest.approx(1.0)
    assert times.expect(0, "KSampler", 1.0) is None


def test_remaining_counts_down_as_time_passes():
    times = learned()
    timeline = Timeline(0, node_costs(txt2img()), times)
    total = sum(SECONDS.values())
    timeline.started(0.0)
    assert timeline.remaining(0.0) == pytest.approx(total)
    timeline.executing("4", 0.0)
    assert timeline.remaining(0.2) == pytest.approx(total - 0.2)
    timeline.executing("6", 0.4)
    timeline.executing("7", 0.45)
    timeline.executing("5", 0.5)
    timeline.executing("3", 0.5)
    seen = [timeline.remaining(0.5)]
    for step in range(1, 21):
        at = 0.5 + 0.45 * step
        seen.append(timeline.remaining(at - 0.2))
        timeline.progress("3", step, 20, at)
        seen.append(timeline.remaining(at))
    assert seen == sorted(seen, reverse=True)
    assert seen[0] > seen[-1]
    assert seen[-1] == pytest.approx(0.5)


def test_a_slow_step_holds_the_countdown_at_the_next_step():
    timeline = Timeline(0, node_costs(txt2img()), learned())
    timeline.started(0.0)
    for node in ["4", "6", "7", "5"]:
        timeline.executing(node, 0.0)
    timeline.executing("3", 0.0)
    timeline.progress("3", 1, 20, 0.45)
    held = timeline.remaining(30.0)
    assert held == pytest.approx(9.0 * 18 / 20 + 0.5)
    timeline.progress("3", 2, 20, 31.0)
    assert timeline.remaining(31.0) == pytest.approx(held)


def test_cached_nodes_cost_nothing_and_are_not_learned():
    times = learned()
    versions = times.version
    timeline = Timeline(0, node_costs(txt2img()), times)
    timeline.started(0.0)
    timeline.cached(["4", "6", "7", "5", "3"])
    assert timeline.fraction() == 0.0
    assert timeline.remaining(0.0) == pytest.approx(0.5)
    timeline.executing("8", 0.0)
    timeline.executing("9", 0.3)
    assert timeline.fraction() == pytest.approx(0.6)
    timeline.finished(0.5, success=True)
    # Nodes 8 and 9, and the job's own overhead beyond its nodes: nothing cached.
    assert times.version == versions + 3
    assert times.expect(0, JOB_OVERHEAD, 1.0) is not None


def test_times_are_learned_per_gpu():
    times = learned(gpu=0)
    run(Timeline(1, node_costs(txt2img()), times))
    timeline = Timeline(1, node_costs(txt2img()), times)
    timeline.started(0.0)
    timeline.executing("4", 0.0)
    timeline.executing("6", 5.0)
    assert times.expect(1, "CheckpointLoaderSimple", 1.0) == pytest.approx(0.4 * 0.7 + 1.5)
    assert times.expect(0, "CheckpointLoaderSimple", 1.0) == pytest.approx(0.4)


events = st.lists(st.one_of(
    st.tuples(st.just("cached"), st.lists(st.sampled_from(ORDER), max_size=3)),
    st.tuples(st.just("executing"), st.sampled_from([*ORDER, None, "99"]),
              st.floats(0, 5)),
    st.tuples(st.just("progress"), st.sampled_from(["3", None, "9"]), st.integers(-1, 25),
              st.sampled_from([20, 0, 16]), st.floats(0, 5)),
    st.tuples(st.just("finished"), st.booleans(), st.floats(0, 5)),
    st.tuples(st.just("learn"), st.sampled_from(["KSampler", "VAEDecode", "SaveImage"]),
              st.floats(0, 50))), max_size=40)


@settings(max_examples=200, deadline=None)
@given(events, st.booleans())
def test_fraction_never_goes_back(sequence, learn_first):
    times = learned() if learn_first else RunTimes()
    timeline = Timeline(0, node_costs(txt2img()), times)
    now = 0.0
    timeline.started(now)
    shown = [timeline.fraction()]
    ended: bool | None = None
    for event in sequence:
        kind = event[0]
        if kind == "cached":
            timeline.cached(event[1])
        elif kind == "executing":
            now += event[2]
            timeline.executing(event[1], now)
        elif kind == "progress":
            now += event[4]
            timeline.progress(event[1], event[2], event[3], now)
        elif kind == "finished":
            now += event[2]
            ended = event[1] if ended is None else ended
            timeline.finished(now, success=event[1])
        else:
            times.observe(1, event[1], 1.0, event[2])
        shown.append(timeline.fraction())
        left = timeline.remaining(now)
        assert left is None or left >= 0
    assert shown == sorted(shown)
    assert all(0.0 <= f <= 1.0 for f in shown)
    assert (shown[-1] == 1.0) == bool(ended)
