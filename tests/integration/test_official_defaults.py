"""Every default the pack takes from a method's official code, pinned here with the file and line it comes from
(issue 26). A researcher compares our defaults with the official code line by line: a change to one of these
must change this file, and its help page, on purpose.

Official sources (commits as read): TencentARC/Mix-of-Show @51270fd, Nihukat/Concept-Conductor @44c6693.
"""

from __future__ import annotations

import pytest


def widget_default(comfy, node_id: str, name: str):
    """The default of a node's widget as ComfyUI serves it (/object_info)."""
    info = comfy.node_class(node_id).INPUT_TYPES()
    for section in ("required", "optional"):
        if name in info.get(section, {}):
            spec = info[section][name]
            return spec[1].get("default") if len(spec) > 1 else None
    raise KeyError(f"{node_id} has no input {name}")


# ------------------------------------------------------------------------------------- Concept Conductor

CC_NODES = ("MultiConceptConceptConductor", "MultiConceptConceptConductorGuider")
# configs/sample_config.yaml (SD1.5); step numbers are of num_inference_steps = 200 (line 41)
CC_SD15 = {
    "alignment_weight": 10.0,  # attn_guidance_weight, line 50
    "alignment_end": 60 / 200,  # attn_guidance_end, line 48
    "alignment_every": 1,  # attn_guidance_interval, line 49
    "refine_start": 50 / 200,  # mask_refinement_start, line 64
    "refine_end": 80 / 200,  # mask_refinement_end, line 65
    "overlap_threshold": 0.0,  # mask_overlap_threshold, line 67
    "kmeans_restarts": 100,  # num_kmeans_init, line 68
}
# configs/sample_sdxl_config.yaml (SDXL), num_inference_steps = 200 (line 39)
CC_SDXL = {
    "alignment_weight": 40.0,  # attn_guidance_weight, line 48
    "alignment_end": 50 / 200,  # attn_guidance_end, line 46
    "alignment_every": 1,  # attn_guidance_interval, line 47
    "refine_start": 60 / 200,  # mask_refinement_start, line 62
    "refine_end": 80 / 200,  # mask_refinement_end, line 63
    "overlap_threshold": 0.7,  # mask_overlap_threshold, line 65
    "kmeans_restarts": 25,  # num_kmeans_init, line 66
}


@pytest.mark.parametrize("node_id", CC_NODES)
def test_concept_conductor_widgets_default_to_the_official_sd15_config(comfy, node_id):
    settings = comfy.pack_module("samplers.concept_conductor.settings")
    for name, official in CC_SD15.items():
        assert widget_default(comfy, node_id, name) == pytest.approx(official), name
        assert getattr(settings.ConductorSettings(), name) == pytest.approx(official), name
        assert getattr(settings.OFFICIAL["sdxl"], name) == pytest.approx(CC_SDXL[name]), name
    assert widget_default(comfy, node_id, "cfg") == 7.5  # guidance_scale, sample_config.yaml:40
    assert widget_default(comfy, node_id, "settings_for") == "the model's family (official)"
    # use_loss_mask: False, sample_config.yaml:71 (sample_sdxl_config.yaml:69)
    assert widget_default(comfy, node_id, "use_loss_mask") is False and not settings.ConductorSettings().use_loss_mask
    # the official alignment takes one step of attn_guidance_weight per step of num_inference_steps = 200 (line 41):
    # 61 (steps 0..60); by default a run repeats it round(61 / its aligned steps) times, each of the official weight
    assert widget_default(comfy, node_id, "alignment_scale") == "repeat to the official 200 steps"
    default = settings.ConductorSettings()
    assert default.scale_to_steps == 200 and default.scale_by == "repeat"
    assert (default.repeats(200), default.step_weight(200)) == (1, 10.0)
    assert len(default.alignment_steps(200)) == 61 and len(default.alignment_steps(30)) == 10
    assert (default.repeats(30), default.step_weight(30)) == (6, 10.0)  # 60 gradient steps in all
    weight = settings.ConductorSettings(scale_by="weight")
    assert (weight.repeats(30), weight.step_weight(30)) == (1, pytest.approx(10.0 * 61 / 10))
    per_step = settings.ConductorSettings(scale_to_steps=None)
    assert (per_step.repeats(30), per_step.step_weight(30)) == (1, 10.0)


def test_concept_conductor_takes_the_sdxl_config_on_an_sdxl_shaped_unet(comfy, tiny_models):
    from tests.support.builders.sdxl import build_tiny_sdxl

    node = comfy.pack_module("nodes.concept_conductor")
    widgets = {name: widget_default(comfy, CC_NODES[1], name) for name in CC_SD15}
    widgets["shape_masks"] = True
    sdxl = build_tiny_sdxl(seed=2, all_cross_attention=True)  # SDXL's 70 cross-attention layers, width 2048
    got = node._settings("Concept Conductor Guider", sdxl, **widgets)
    assert {name: getattr(got, name) for name in CC_SDXL} == pytest.approx(CC_SDXL)
    got = node._settings("Concept Conductor Guider", tiny_models[0], **widgets)  # SD1.5 keeps SD1.5's
    assert {name: getattr(got, name) for name in CC_SD15} == pytest.approx(CC_SD15)
    # a value the user set is kept; "as set here" keeps them all
    got = node._settings("Concept Conductor Guider", sdxl, **{**widgets, "alignment_weight": 12.0})
    assert got.alignment_weight == 12.0 and got.overlap_threshold == 0.7
    got = node._settings("Concept Conductor Guider", sdxl, **widgets, settings_for="as set here")
    assert {name: getattr(got, name) for name in CC_SD15} == pytest.approx(CC_SD15)


def test_concept_conductor_kmeans_tries_n_plus_1_to_2n_plus_1_clusters(comfy):
    # attention_processor.py:497-500: num_clusters_min = len(all_token_ids) (N concepts + the base branch),
    # range(num_clusters_min, 2 * num_clusters_min)
    counts = comfy.pack_module("samplers.concept_conductor.masks").cluster_counts
    assert [list(counts(n)) for n in (1, 2, 3)] == [[2, 3], [3, 4, 5], [4, 5, 6, 7]]


# ------------------------------------------------------------------------------------------- Mix-of-Show


def test_mixofshow_box_negative_empty_is_the_empty_prompt(comfy):
    # mixofshow/pipelines/pipeline_regionally_t2iadapter.py:286-295: a region's negative is encoded as written,
    # [''] when None; the global negative never stands in for it
    assert widget_default(comfy, "MultiConceptMixOfShowRegional", "empty_box_negative") == "empty, as the official code"


# ---------------------------------------------------------------------------------------- Fuse Concepts


def test_fuse_concepts_defaults_are_the_official_gradient_fusion(comfy):
    fuse = comfy.pack_module("samplers.fusion.fuse")
    node = "MultiConceptFuseConcepts"
    # unet_alpha = text_encoder_alpha = 1.0 in datasets/data_cfgs/MixofShow/multi-concept/*/*.json
    assert widget_default(comfy, node, "strengths") == "1.0, as the official fusion"
    assert fuse.FusionSettings().strengths == fuse.FUSION_STRENGTHS[0]
    # gradient_fusion.py:688 num_inference_steps=20; :595-596 512x512; :176 DPMSolverMultistepScheduler
    assert widget_default(comfy, node, "sample_steps") == 20 and widget_default(comfy, node, "sample_size") == 512
    assert fuse.FusionSettings().sampler == "dpmpp_2m"
    # fuse.sh: --optimize_textenc_iters=500 --optimize_unet_iters=50 (the L-BFGS solver)
    assert (fuse.FusionSettings().text_iters, fuse.FusionSettings().unet_iters) == (500, 50)
    # gradient_fusion.py:19 TEMPLATE_SIMPLE = 'photo of a {}', and the bare concept name (:517-520)
    assert fuse.DEFAULT_TEMPLATES == ("photo of a {}", "{}")


# -------------------------------------------------------------------------------------------------- OMG


@pytest.mark.parametrize("node_id", ["MultiConceptOMG", "MultiConceptOMGGuider"])
def test_omg_samples_each_concept_at_the_official_strength(comfy, node_id):
    # kongzhecn/OMG @e1bd7a8: inference_lora.py:64 cross_attention_kwargs={"scale": 0.8}, which
    # src/pipelines/lora_pipeline.py:306-307 also takes as the text encoder's lora_scale (stage 2: :596)
    stages = comfy.pack_module("samplers.omg.stages")
    assert stages.OFFICIAL_STRENGTH == 0.8
    assert widget_default(comfy, node_id, "strengths") == "0.8, as the official OMG"


@pytest.mark.parametrize("node_id", ["MultiConceptOMG", "MultiConceptOMGStage1"])
def test_omg_samples_with_the_official_steps_cfg_and_start(comfy, node_id):
    # kongzhecn/OMG @e1bd7a8 inference_lora.py:42 num_inference_steps=50, :43 guidance_scale=7.5; the blend
    # starts after step 15 of 50 (lora_pipeline.py:568 `if i > 15 and stage == 2`): step 16, our start 0.32
    assert widget_default(comfy, node_id, "steps") == 50 and widget_default(comfy, node_id, "cfg") == 7.5
    assert widget_default(comfy, node_id, "start") == 0.32 and round(0.32 * 50) == 16


# ------------------------------------------------------------------------------------------ LoRA-Composer


def test_lora_composer_defaults_are_the_official_code(comfy):
    # Young98CN/LoRA_Composer @a48a5a5, region_lora/multi_lora_sample.py unless named
    node = "MultiConceptLoRAComposer"
    # :315 base to_q, :343-347 the concept's to_k/to_v on the box prompt, :299 its to_out on the box result
    assert widget_default(comfy, node, "lora_layers") == "cross-attention k, v and out"
    assert widget_default(comfy, node, "top_k_ratio") == pytest.approx(0.2)  # :39, :835
    assert widget_default(comfy, node, "smoothing") == pytest.approx(0.5)  # :832 sigma=0.5
    assert widget_default(comfy, node, "step_size") == pytest.approx(20.0)  # :801 lr = 20 * sqrt(scale_range[i])
    assert widget_default(comfy, node, "region") == pytest.approx(10.0)  # :104 10 * fg_bg_self_att
    assert widget_default(comfy, node, "fill") == pytest.approx(2.0)  # :95-96 2 * l1_loss per projection
    assert widget_default(comfy, node, "cfg") == pytest.approx(7.5)  # inference/region_lora_sample.py:24
