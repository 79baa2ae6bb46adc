import time, warnings, traceback, torch, xpu_coopt, collections
from xpu_coopt.models import load_model
from xpu_coopt.bench import _generate_kwargs
hf, _ = load_model("llama-2-7b", torch.float16, "cuda")
opt = xpu_coopt.optimize(hf, dtype=torch.float16)
ids = torch.randint(3, 30000, (1, 1024), device="cuda")
for beams in (4, 1):
    kw = _generate_kwargs(dict(num_beams=beams, eos_token_id=2, pad_token_id=0), 8)
    opt.generate(ids, **kw)
    seen = collections.Counter()
    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "xpu_coopt" in f.filename]
        seen[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}" for f in frames[::-1][:2])] += 1
    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    opt.generate(ids, **kw)
    torch.cuda.set_sync_debug_mode(0)
    print("=== beams", beams, "sync sites:", sum(seen.values()))
    for stack, n in seen.most_common(12):
        print("x%d  %s" % (n, stack))
