"""The shared core every package may import: the one reader of raw rows and ``dataset.json`` (``core.dataset``),
the public transform in numpy (``core.features``), process isolation (``core.netns``), and process groups that
are always stopped plus free ports (``core.processes``). Nothing here is private-data aware beyond reading it;
nothing here imports another privtrain package."""
