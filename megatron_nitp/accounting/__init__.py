"""What a job costs, counted from its configuration without running it: parameters
(``parameters``), FLOPs (``flops``), the memory per GPU (``memory_plan``), the checkpoint's size
(``checkpoint``), and ``--dry-run`` (``dry_run``), which checks a job's layout and prints them.
``shape`` holds the model shapes they count from, ``parallel`` the parallel layout, and
``preset_table`` the ``--list-presets`` table.

Nothing here builds a model or starts a process group: the counts come from the shapes, and the
tests hold them to megatron-core's built modules. The package stands above ``config/`` (whose
settings it reads) and ``data/`` (the dry run builds the tokenizer and checks the data files);
training imports it to print the plan beside what a run measures (``training/memory.py``).
"""
