"""Training: ``train`` (the gin entry point and its typed options), the loop of
epochs, the ``Trainer`` (model, EMA, optimizer, compiled steps), checkpoints while
training (``saver``), signals, preemption and the time budget (``faults``), what a run
reports (``reporting``) and passes over the data (``passes``).

Nothing under ``pixelcnn.inference`` imports this package."""
