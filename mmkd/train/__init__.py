"""The training app: recipe, run directory, runner, the one LightningModule, strategies, callbacks, teachers.

Only this layer (and ``mmkd.data.datamodule``) imports Lightning. Import the modules themselves
(``mmkd.train.runner``, ``mmkd.train.recipe``); this package imports nothing eagerly.
"""
