"""OMG (occlusion-friendly two-stage noise blending): the blend maths (``blend``), pure torch."""
