"""End-to-end training steps (pytest-benchmark): AdamW vs SAM vs naive FSAM vs FSAM per backend."""
from .e2e import make_batch, measure_e2e, measure_e2e_interleaved
from .plan import model


def test_e2e(request, plan, record, e2e_case):
    c = e2e_case
    m = model(c.model, plan.device)
    batch = make_batch(m, c.batch, c.seq, plan.device)
    s = plan.settings
    if len(c.methods) > 1:  # timed here, interleaved (pytest-benchmark times one function per test)
        record(measure_e2e_interleaved(m, batch, c.model, list(c.methods), rounds=s.e2e_rounds_for(c.model),
                                       warmup=s.e2e_warmup, mode=plan.mode))
        return
    benchmark = request.getfixturevalue("benchmark")
    benchmark.group = f"e2e {c.model}"
    used = []

    def pedantic_for(op):
        # pytest-benchmark allows one measurement per test: it takes the steady-state step
        if op == "e2e_step" and not used:
            used.append(op)
            return benchmark.pedantic
        return None

    record(measure_e2e(m, batch, c.model, c.methods[0], rounds=s.e2e_rounds_for(c.model), warmup=s.e2e_warmup, mode=plan.mode,
                       pedantic_for=pedantic_for))
