"""The report's sections, in the order it prints them; each module has one ``render(facts)``
that returns the section's Markdown lines (:class:`..facts.Facts` holds all they state)."""

from . import curves, header, per_seed, phases, probe, reading, reproduce, results, setup

SECTIONS = (header, setup, curves, results, phases, probe, reading, per_seed, reproduce)
