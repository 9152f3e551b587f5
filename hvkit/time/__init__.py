"""Guest time: TSC scaling arithmetic, per-VM TSC programming and saved
state, and the timer-interrupt policy that keeps a guest's clock coherent."""
