"""Configuration, in three modules: settings.py (what a valid config holds, one class per auth.type), schema.py
(every key's type, default, range and doc, written once) and reader.py (reads the file and the environment against
the schema: `load`, `parse`), with checks.py for the rules that span a route's keys."""
