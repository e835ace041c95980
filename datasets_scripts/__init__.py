"""spn4cir datasets_scripts."""
