"""The Ray adapters: the only place that imports Ray (a ruff rule enforces it). Each wraps the pure-torch core:
the Train worker runs ``loop.run_loop``, the bank actor serves ``bank.BankService``, the eval pool runs
``fid.evaluate_checkpoint``, the driver and the Tune sweep launch them; ``ray_compat`` holds the workarounds of
Ray internals behind a version check."""
