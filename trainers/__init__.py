"""spn4cir trainers."""
