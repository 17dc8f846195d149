"""`memfit background`: compute the background slot statistics (the IDF side) of a model.

They are saved as background.safetensors beside the model; with --to-redis they are also seeded into
Redis for the distributed mode (workers.background_redis).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def run(args) -> int:
    from memlm.background import compute_for_model_dir
    from memlm.paths import default_model_dir

    model_dir = Path(args.model).expanduser() if args.model else default_model_dir("default")
    if not (model_dir / "config.json").exists():
        print(f"no model at {model_dir}; build one with `memfit pretrain` or pass --model", file=sys.stderr)
        return 2
    seed_redis = None
    if args.to_redis:
        try:
            seed_redis = importlib.import_module("workers.background_redis").seed
        except ImportError as exc:
            raise SystemExit("--to-redis needs the distributed mode (workers/)") from exc

    # no --unit: the unit the model was built with (training_report.json), else the default
    served = getattr(args, "served_facts", None)
    if served is not None and served < 0:
        print(f"--served-facts must be >= 0, got {served}", file=sys.stderr)
        return 2
    from memlm.retrofit import is_retrofitted

    if is_retrofitted(model_dir):  # no memfit corpus to count: the statistics `memfit retrofit` wrote
        from memlm.background import BackgroundStats, model_base_id

        if args.unit or served is not None or not (model_dir / "background.safetensors").exists():
            print(
                f"{model_dir} is a `memfit retrofit` model: its background statistics are computed over "
                "your text by `memfit retrofit --background-texts FILE` (this command only seeds them "
                "into Redis with --to-redis)",
                file=sys.stderr,
            )
            return 2
        stats = BackgroundStats.load(model_dir, expected_base_id=model_base_id(model_dir))
    else:
        stats = compute_for_model_dir(model_dir, unit=args.unit, progress=True, served_facts=served)
    for layer, df in stats.df.items():
        used = int((df > 0).sum())
        print(
            f"layer {layer}: {used}/{len(df)} slots accessed in {stats.num_docs} {stats.unit} documents, "
            f"max df {int(df.max())}"
        )
    done = "read" if is_retrofitted(model_dir) else "saved"
    print(f"{done} {model_dir / 'background.safetensors'}")
    if seed_redis is not None:
        from memfit.config import Settings, redacted, redis_url_with_password

        s = Settings()  # MEMFIT_REDIS_PASSWORD(_FILE): the same password as the service's clients
        password = s.redis_password_file.read_text().strip() if s.redis_password_file else s.redis_password
        url = redis_url_with_password(args.to_redis, password) if password else args.to_redis
        seed_redis(url, stats)
        print(f"seeded {redacted(url)}")
    return 0
