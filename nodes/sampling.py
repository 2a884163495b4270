"""What the sampler nodes (those that work like a KSampler: Concept Conductor Sampler, OMG Sampler) share at
run time: checking the sampler and scheduler names, sampling a guider, the LATENT output."""

from __future__ import annotations

import logging

from ..samplers.scene_conditioning import check_scene_conditioning, same_text
from .common import NodeError, show_text

log = logging.getLogger("multiconcept")


def check_sampler_names(node: str, sampler_name, scheduler) -> None:
    """NodeError unless both are ComfyUI's names: ComfyUI does not check V3 combo values against their options,
    and an unknown name would fail deep inside sampling."""
    import comfy.samplers

    for name, value, options in (
        ("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS),
        ("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS),
    ):
        if value not in options:
            raise NodeError(node, f"{name} is {str(value)[:40]!r}; pick one from the list (e.g. {options[0]}).")


def sample_guider(guider, latent_image: dict, seed: int, sampler_name: str, sigmas, callback):
    """``guider`` run on ``latent_image`` as SamplerCustomAdvanced runs it (the seed's noise for the batch, the
    named sampler, ``sigmas``), with ``callback(step, x0, x, total)`` after each step instead of a console bar."""
    import comfy.sample
    import comfy.samplers

    samples = latent_image["samples"]
    noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
    sampler = comfy.samplers.sampler_object(sampler_name)
    return guider.sample(noise, samples, sampler, sigmas, callback=callback, disable_pbar=True, seed=seed)


def latent_output(latent_image: dict, samples) -> dict:
    """A LATENT output: the input latent's entries with new ``samples`` and without its noise mask."""
    out = dict(latent_image)
    out["samples"] = samples
    out.pop("noise_mask", None)
    return out


def scene_conds(node: str, model, given, positive, negative, text: str):
    """The scene's ``(positive, negative)``: the ``given`` conditionings (positive_conditioning,
    negative_conditioning) where connected, checked against the MODEL (SceneConditioningError), else the node's own
    encodings; a given positive that is not the encoding of ``text`` ('the scene prompt') is warned about."""
    given_pos, given_neg = given
    if given_pos is not None:
        check_scene_conditioning(given_pos, model, "positive_conditioning")
        if not same_text(given_pos, positive):
            warning = (f"{node}: positive_conditioning is not {text}'s encoding; it is sampled as given, and the "
                       f"words the method needs are read from {text}.")  # fmt: skip
            log.warning("[multi-concept] %s", warning)
            show_text(warning)
        positive = given_pos
    if given_neg is not None:
        negative = check_scene_conditioning(given_neg, model, "negative_conditioning")
    return positive, negative
