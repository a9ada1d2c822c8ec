"""An example defbench plugin. Its defense registers through the ``defbench.defenses`` entry point
(see pyproject.toml); importing this package alone registers nothing."""
