"""Root conftest: what ``--doctest-modules`` must not import while collecting.

Test modules' ``from conftest import need_data`` still gets tests/conftest.py: pytest imports
this file first and re-imports the module name ``conftest`` for each conftest outside a package.
"""

# hefl/cli/__main__.py calls main() when imported (it is ``python -m hefl.cli``): importing it to
# look for doctests would run the CLI inside pytest. pytest's doctest plugin already passes over
# files named __main__.py (pytest 9.2); naming it here keeps it out whatever that rule becomes.
collect_ignore = ["hefl/cli/__main__.py"]
