"""Which concept and prompt goes to which box, and the errors users can fix (pure Python)."""

from __future__ import annotations

import pytest

from multiconcept.samplers.concept_stack.stack import Concept, ConceptStack
from multiconcept.samplers.mixofshow.plan import RegionalPlanError, parse_region_weights, plan_regions
from multiconcept.samplers.regions.layout import parse_regions


def _regions(*boxes):
    return parse_regions('{"boxes": ' + __import__("json").dumps(list(boxes)) + "}", 64, 64)


def _stack(*concepts):
    stack = ConceptStack()
    for words, label in concepts:
        stack = stack.with_concept(
            Concept(uid="", kind="lora", source=f"{label or words}.safetensors", words=words, label=label)
        )
    return stack


BOX_A = {"x": 0, "y": 0, "w": 0.5, "h": 1, "label": "a", "prompt": "a photo of <a1> <a2>, a man"}
BOX_B = {"x": 0.5, "y": 0, "w": 0.5, "h": 1, "label": "b", "prompt": "a photo of <b1>, a dog", "negative": "cat"}


def test_concepts_go_to_their_labelled_boxes_or_the_box_naming_them():
    stack = _stack((("<a1>", "<a2>"), "a"), (("<b1>",), ""))
    plans = plan_regions(stack, _regions(BOX_A, BOX_B), "a man and a dog", "", [1.0, 2.0])
    assert [p.concepts for p in plans] == [(0,), (1,)]
    assert plans[1].negative == "cat" and plans[1].weight == 2.0


def test_plain_prompts_without_concepts_are_regional_prompting():
    plain = dict(BOX_A, prompt="a red car")
    plans = plan_regions(ConceptStack(), _regions(plain), "a street", "", [1.0])
    assert plans[0].concepts == ()


@pytest.mark.parametrize(
    "stack, boxes, global_prompt, message",
    [
        (ConceptStack(), [BOX_A], "a man", "<a1> <a2>, which no concept of the stack has"),
        (_stack((("<a1>", "<a2>"), "nowhere")), [BOX_A], "a man", "no box has that label"),
        (_stack((("<a1>", "<a2>"), "a")), [BOX_A], "  ", "the global prompt is empty"),
        (_stack((("<a1>", "<a2>"), "a")), [dict(BOX_A, prompt=" ")], "a man", "box 1 'a' has no prompt"),
        (_stack((("<z1>",), "")), [dict(BOX_A, prompt="a man")], "a man", "is in no box"),
    ],
)
def test_mismatches_are_named(stack, boxes, global_prompt, message):
    with pytest.raises(RegionalPlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_regions(stack, _regions(*boxes), global_prompt, "", [1.0] * len(boxes))


def test_the_unknown_word_error_lists_the_loaded_concepts():
    stack = _stack((("<b1>",), "b"))
    with pytest.raises(RegionalPlanError) as e:
        plan_regions(stack, _regions(BOX_A, BOX_B), "a man", "", [1.0, 1.0])
    assert "<b1> (b.safetensors, region 'b')" in str(e.value)


def test_region_weights_by_order_or_label():
    regions = _regions(BOX_A, BOX_B)
    assert parse_region_weights("", regions) == [1.0, 1.0]
    assert parse_region_weights("1, 2.5", regions) == [1.0, 2.5]
    assert parse_region_weights("b=3", regions) == [1.0, 3.0]
    for bad, message in [
        ("1", "2 boxes"),
        ("c=2", "no box has that label"),
        ("1, -1", "positive"),
        ("x, 1", "not a number"),
    ]:
        with pytest.raises(RegionalPlanError, match=message):
            parse_region_weights(bad, regions)
