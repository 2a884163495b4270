"""Mix-of-Show regionally controllable sampling: the maths (``regional_attention``), the plan of which concept
and prompt goes to which region (``plan``), and the ComfyUI glue (``sampling``)."""
