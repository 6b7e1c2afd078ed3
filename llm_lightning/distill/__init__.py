"""Knowledge distillation as a library, like pruning/: the losses, the teacher and its cache, and
how a student is built from a teacher. The Lightning side is callbacks/distill.py."""
