"""Helpers shared by the tests (no tests here; nothing in this package imports a test module).

numerics           rel_err: the one relative-error measure of the suite
jacobian_oracle    per-sample Jacobian of one layer from torch.func (float64), plan comparison
layer_cases        the layer configurations (cases as data), each case set up once (float64 oracle J)
steps_as_printed   check that a compiled plan runs the steps ``repr(plan)`` prints
triton_cases       the Triton interpreter battery: generated kernels against the torch backend
optim_cases        models, batches and losses of the optimizer tests
step_oracle        the dense float64 step -lr (F_b + a I)^-1 g_b of the optimizer, from torch.func
snapshots          bit-for-bit snapshots of a model and its optimizer (refused calls change nothing)
dist_harness       run a function on R gloo processes, fail instead of hanging
distributed_workers  what each rank runs in test_optim_distributed.py, and the phases it runs in
background         jobs started when collection ends, run in other processes beside the suite
"""
