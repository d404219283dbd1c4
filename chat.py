"""Chat with TeleChat2 in the terminal, or answer a file of prompts:
`python chat.py model.path=DIR [adapter_path=ADAPTER] [infer_backend=vllm] [input=FILE output=OUT]`."""

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="conf", config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from telechat_lab.chat.engines import HuggingFaceEngine, VLLMEngine, resolve_paths
    from telechat_lab.chat.session import ChatSession, batch, interactive

    base, adapters = resolve_paths(cfg.model.path, cfg.adapter_path)
    if cfg.infer_backend == "vllm":
        engine = VLLMEngine(base, adapters, **OmegaConf.to_container(cfg.vllm))
    elif cfg.infer_backend == "huggingface":
        engine = HuggingFaceEngine(base, adapters, cfg.model.dtype, cfg.model.attn_implementation, cfg.device)
    else:
        raise ValueError(f"infer_backend={cfg.infer_backend}: use huggingface or vllm")
    session = ChatSession(engine, base, cfg.system, cfg.default_system, OmegaConf.to_container(cfg.generation))
    if cfg.input:
        batch(session, cfg.input, cfg.output)
    else:
        interactive(session)


if __name__ == "__main__":
    main()
