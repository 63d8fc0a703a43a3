"""The tools around the processor, apart from its runtime: `paystream demo`, `paystream bench`
and the acceptance oracle (reconcile) that both and the tests use. The processor never imports
them; they import what they measure or drive."""
