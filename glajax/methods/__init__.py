"""Pure, jittable post-hoc methods over logits and parameter pytrees."""
