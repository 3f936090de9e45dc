"""data_tools/pack_pile.py, the packing command; a package so that tests import it."""
