"""The benchmark machinery (``mnist-cnn-bench``): ``measure`` times the contenders and runs,
``levers`` each speed setting in its own process, ``profile`` the machine's ceilings and where
a step's time goes, ``report`` the lines a person reads. Training never imports this package."""
