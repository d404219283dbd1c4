"""Merge LoRA / DoRA adapters into their base and export a HF + vLLM ready directory:
`python merge.py adapter_path=DIR export_dir=OUT` (see conf/merge.yaml)."""

import hydra
from omegaconf import DictConfig, ListConfig


@hydra.main(config_path="conf", config_name="merge", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from telechat_lab.export import export, merge_adapters

    adapters = list(cfg.adapter_path) if isinstance(cfg.adapter_path, ListConfig) else [cfg.adapter_path]
    model, base = merge_adapters(cfg.model.path, adapters, device=cfg.export_device)
    out = export(model, base, cfg.export_dir, dtype=cfg.dtype, export_size=cfg.export_size,
                 legacy_format=cfg.export_legacy_format)
    print(f"merged {len(adapters)} adapter(s) into {base}\nexported to {out}\n"
          f"serve it: vllm serve {out} --trust-remote-code")


if __name__ == "__main__":
    main()
