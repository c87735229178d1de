"""CAT Pruning: the choice of tokens against a naive oracle on given outputs, and multi-step runs of tiny
SD3 (and SD3.5, PixArt, DiT) denoisers and an SD3 pipeline: recomputing every token equals the model,
the full steps are the model's, later steps compute fewer rows, CFG batched or split agree."""

from __future__ import annotations

import pytest
import torch
from diffusion_models import BUILDERS, diffusers, sd3  # noqa: F401  (diffusers: skips without it)
from diffusion_models import vae as tiny_vae

import tokenreduce
from naive_cat_pruning import Simulation, choices, tokens
from tokenreduce.methods.cat_pruning import CatPruning
from tokenreduce.methods.denoiser import DenoiserContext, Recompute


def drive(method: CatPruning, outputs: list[torch.Tensor], first_input: torch.Tensor, grid: tuple[int, int]):
    """Feed one call per step to the method as the engine would (block 0's plan, then observe); return
    the rows each step recomputed (``None`` for a full step) and the outputs it returned."""
    memory = method.new_memory()
    chosen, finals = [], []
    for step, out in enumerate(outputs):
        plan = method.plan(first_input, DenoiserContext(0, 1, 1, grid, None, step, memory))
        chosen.append(plan.index if isinstance(plan, Recompute) else None)
        replaced = method.observe(out, DenoiserContext(-1, 1, 1, grid, None, step, memory))
        finals.append(out if replaced is None else replaced)
    return chosen, finals


CASES = [  # grid, patch, channels, select_factor, stop_idx, clusters
    ((9, 11), 1, 4, 0.3, 1, 6),
    ((6, 5), 2, 3, 0.55, 0, 4),
    ((12, 12), 1, 8, 0.3, 2, 20),
    ((7, 9), 2, 2, 1.0, 1, 5),
]


@pytest.mark.parametrize("grid,patch,channels,factor,stop_idx,clusters", CASES)
@pytest.mark.parametrize("cfg", ["none", "cond_last", "cond_first"])
def test_choice_matches_naive_oracle(grid, patch, channels, factor, stop_idx, clusters, cfg):
    rows, cols = grid
    gen = torch.Generator().manual_seed(rows * cols + channels)
    steps = stop_idx + 12
    images = 2
    batch = images if cfg == "none" else 2 * images
    outputs = [torch.randn(batch, channels, rows * patch, cols * patch, generator=gen) for _ in range(steps)]
    first = torch.randn(images, rows * cols, 5, generator=gen)
    first = first if cfg == "none" else torch.cat([first, first])  # batched CFG: two copies of each latent
    method = CatPruning(
        select_factor=factor, stop_idx=stop_idx, clusters=clusters, kmeans_iterations=6, cond_first=cfg == "cond_first"
    )
    chosen, finals = drive(method, outputs, first, grid)

    budget = max(1, int(factor * rows * cols))
    for image in range(images):
        guide = image + images if cfg == "cond_last" else image  # the conditional copy
        want = choices([tokens(o[guide], grid) for o in outputs], grid, factor, stop_idx, clusters, 6)
        for step in range(steps):
            if step <= stop_idx + 2:
                assert chosen[step] is None
                continue
            rows_of_image = [image] if cfg == "none" else [image, image + images]
            for row in rows_of_image:
                assert chosen[step][row].tolist() == want[step], (image, step)
            assert len(want[step]) == budget
    # Reused outputs: a token left out at a step keeps its whole patch of the step before.
    for step in range(stop_idx + 3, steps):
        for row in range(outputs[step].shape[0]):
            kept = set(chosen[step][row].tolist())
            for t in range(rows * cols):
                r, c = divmod(t, cols)
                cell = (row, slice(None), slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
                source = outputs[step] if t in kept else finals[step - 1]
                assert torch.equal(finals[step][cell], source[cell])


def test_full_steps_and_budget_one_recompute_everything():
    method = CatPruning(select_factor=1.0, stop_idx=0)
    outputs = [torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    chosen, finals = drive(method, outputs, torch.randn(1, 35, 3), (5, 7))
    assert chosen[:3] == [None, None, None]
    assert all(torch.equal(c, torch.arange(35)[None]) for c in chosen[3:])
    assert all(torch.equal(f, o) for f, o in zip(finals, outputs))


def multi_step(model, inputs: dict, steps: int, cfg: bool = False, positional: bool = False) -> list[torch.Tensor]:
    """A plain Euler loop over decreasing timesteps; the output of every call. With ``cfg`` the batch
    holds ``[uncond, cond]`` copies of one latent, stepped by the guided noise."""
    latent, outs = inputs["hidden_states"], []
    with torch.no_grad():
        for step in range(steps):
            t = torch.full((latent.shape[0],), 1000.0 - 110.0 * step)
            kwargs = {**inputs, "hidden_states": latent, "timestep": t}
            if positional:  # SD3's order: hidden_states, encoder_hidden_states, pooled_projections, timestep
                values = [kwargs.pop(k) for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")]
                out = model(*values, **kwargs, return_dict=False)[0]
            else:
                out = model(**kwargs, return_dict=False)[0]
            outs.append(out)
            noise = out[:, : latent.shape[1]]
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = torch.cat([uncond + 4.0 * (cond - uncond)] * 2)
            latent = latent - 0.1 * noise
    return outs


def cfg_inputs(name: str, h: int = 16, w: int = 16) -> tuple[torch.nn.Module, dict]:
    d = BUILDERS[name]()
    inputs = d.inputs(batch=2, h=h, w=w)
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"][:1]] * 2)
    return d.model, inputs


@pytest.mark.parametrize("name", ["sd3", "sd3_dual", "pixart", "dit"])
def test_recomputing_every_token_equals_the_model(name):
    model, inputs = cfg_inputs(name, 12, 12) if name == "dit" else cfg_inputs(name, 10, 14)  # diffusers' DiT: square only
    base = multi_step(model, inputs, 7, cfg=True)
    tokenreduce.apply(model, "cat_pruning", select_factor=1.0, stop_idx=1)
    got = multi_step(model, inputs, 7, cfg=True)
    assert tokenreduce.record(model).calls[0].tokens_out == tokenreduce.record(model).calls[0].tokens_in
    tokenreduce.remove(model)
    for a, b in zip(base, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(base, multi_step(model, inputs, 7, cfg=True)))  # remove restores it


@pytest.mark.parametrize("name", ["sd3", "sd3_dual", "pixart"])
def test_pruned_steps_match_a_simulation_on_the_unpatched_model(name):
    """Cached keys, values and outputs, the text's full attention and the reused output patches, against
    the modules of the unpatched model rerun in full on inputs holding each token's last computed row."""
    model, inputs = cfg_inputs(name, 10, 14)
    grid = (10 // model.config.patch_size, 14 // model.config.patch_size)
    factor, stop, steps = 0.3, 1, 9
    got = multi_step(
        tokenreduce.apply(model, "cat_pruning", select_factor=factor, stop_idx=stop, clusters=5), inputs, steps, cfg=True
    )
    tokenreduce.remove(model)
    sim = Simulation(model, ("attn", "attn1", "attn2", "ff"), grid, factor, stop, 5, 30)
    latent, noises = inputs["hidden_states"], []
    with torch.no_grad():
        for step in range(steps):
            t = torch.full((2,), 1000.0 - 110.0 * step)
            out = sim.step(step, model, {**inputs, "hidden_states": latent, "timestep": t}, noises)
            torch.testing.assert_close(got[step], out, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            uncond, cond = out[:, : latent.shape[1]].chunk(2)
            latent = latent - 0.1 * torch.cat([uncond + 4.0 * (cond - uncond)] * 2)
    sim.remove()


class RowCounter:
    """Rows (tokens) a module's forward is called on, summed per call of the denoiser."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(lambda _, args: setattr(self, "rows", self.rows + args[0].shape[1]))


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_pruned_steps_compute_fewer_rows(name):
    model, inputs = cfg_inputs(name, 12, 10)
    stop, steps = 1, 8
    base = multi_step(model, inputs, steps, cfg=True)
    tokenreduce.apply(model, "cat_pruning", stop_idx=stop)
    blocks = model.transformer_blocks
    counters = [RowCounter(blocks[0].ff.net[0]), RowCounter(blocks[0].attn.to_q if name == "sd3" else blocks[0].attn1.to_q)]
    n = inputs["hidden_states"].shape[-2] * inputs["hidden_states"].shape[-1] // model.config.patch_size**2
    budget = int(0.3 * n)
    latent, outs = inputs["hidden_states"], []
    with torch.no_grad():
        for step in range(steps):
            before = [c.rows for c in counters]
            t = torch.full((2,), 1000.0 - 110.0 * step)
            out = model(**{**inputs, "hidden_states": latent, "timestep": t}, return_dict=False)[0]
            rec = tokenreduce.record(model)
            computed = [c.rows - b for c, b in zip(counters, before)]
            if step <= stop + 2:
                assert torch.equal(out, base[step]), step  # the full steps are the model's
                assert rec.reduced_blocks == 0
            else:
                assert rec.step == step and rec.reduced_blocks == len(blocks)
                assert all(call.tokens_out == budget and call.tokens_in == n for call in rec.calls)
                assert computed == [budget, budget], step  # the MLP and the queries ran on the chosen rows only
            outs.append(out)
            uncond, cond = out[:, : latent.shape[1]].chunk(2)
            latent = latent - 0.1 * torch.cat([uncond + 4.0 * (cond - uncond)] * 2)
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.allclose(outs[-1], base[-1], atol=1e-3)
    tokenreduce.remove(model)


def test_batched_and_split_cfg_agree():
    d = sd3()
    inputs = d.inputs(batch=2, h=12, w=12)
    latent0 = inputs["hidden_states"][:1]
    text, pooled = inputs["encoder_hidden_states"], inputs["pooled_projections"]
    tokenreduce.apply(d.model, "cat_pruning", stop_idx=0)

    def loop(split: bool) -> list[torch.Tensor]:
        latent, outs = latent0, []
        with torch.no_grad():
            for step in range(7):
                t = 1000.0 - 120.0 * step
                if split:  # uncond, then cond, at one timestep: one step
                    parts = [d.model(hidden_states=latent, timestep=torch.tensor([t]), encoder_hidden_states=text[i : i + 1],
                                     pooled_projections=pooled[i : i + 1], return_dict=False)[0] for i in range(2)]  # fmt: skip
                    out = torch.cat(parts)
                else:
                    out = d.model(hidden_states=torch.cat([latent] * 2), timestep=torch.tensor([t, t]),
                                  encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
                outs.append(out)
                uncond, cond = out.chunk(2)
                latent = latent - 0.1 * (uncond + 4.0 * (cond - uncond))
        return outs

    batched, split = loop(False), loop(True)
    assert tokenreduce.record(d.model).reduced_blocks == 2
    for a, b in zip(batched, split):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    tokenreduce.remove(d.model)


def test_batch_without_cfg_equals_singles_and_positional_calls():
    d = sd3()
    inputs = d.inputs(batch=2, h=10, w=12)  # two latents, no guidance: each row is its own image
    tokenreduce.apply(d.model, "cat_pruning", stop_idx=0, select_factor=0.4)
    both = multi_step(d.model, inputs, 6)
    for row in range(2):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        alone = multi_step(d.model, single, 6, positional=row == 1)
        for a, b in zip(both, alone):
            torch.testing.assert_close(b, a[row : row + 1], rtol=1e-5, atol=1e-5)
    tokenreduce.remove(d.model)


def sd3_pipeline():
    d = sd3()
    vae = tiny_vae(flow=True)
    none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"])
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = diffusers.StableDiffusion3Pipeline(transformer=d.model, scheduler=scheduler, vae=vae, **none)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds = dict(
        prompt_embeds=torch.randn(1, 8, 32, generator=g),
        pooled_prompt_embeds=torch.randn(1, 64, generator=g),
        negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 64, generator=g),
    )

    def generate() -> torch.Tensor:
        out = pipe(**embeds, num_inference_steps=8, height=32, width=48, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(1), output_type="latent")  # fmt: skip
        return out.images

    return pipe, generate


def test_sd3_pipeline():
    pipe, generate = sd3_pipeline()
    base = generate()
    tokenreduce.apply(pipe, "cat_pruning", select_factor=1.0, stop_idx=1)
    torch.testing.assert_close(generate(), base, rtol=0, atol=1e-6)
    tokenreduce.apply(pipe, "cat_pruning", stop_idx=1)
    assert "recomputes chosen tokens in 2 of 2 token blocks" in tokenreduce.describe(pipe)
    first = generate()
    rec = tokenreduce.record(pipe)
    assert rec.step == 7 and rec.reduced_blocks == 2 and rec.calls[0].tokens_out == int(0.3 * 16 * 24)
    second = generate()  # a new generation starts afresh: the same latents again
    assert torch.equal(first, second)
    assert torch.isfinite(first).all() and not torch.allclose(first, base, atol=1e-4)
    tokenreduce.remove(pipe)
    assert torch.equal(generate(), base)


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_unsupported_denoisers_raise_at_apply(name):
    model = BUILDERS[name]().model
    with pytest.raises(TypeError, match=r"output is their token grid \(DiTTransformer2DModel, PixArtTransformer2DModel, SD3"):
        tokenreduce.apply(model, "cat_pruning")
    assert not tokenreduce.is_patched(model)


def test_other_attention_processors_raise_at_apply():
    model = sd3().model
    model.transformer_blocks[1].attn.set_processor(diffusers.models.attention_processor.AttnProcessor())
    with pytest.raises(TypeError, match=r"transformer_blocks.1.attn: its attention processor is AttnProcessor, not one of"):
        tokenreduce.apply(model, "cat_pruning")


@pytest.mark.parametrize(
    "config,error,match",
    [
        (dict(select_factor=0), ValueError, r"select_factor must be a number in \(0, 1\], got 0"),
        (dict(select_factor=1.5), ValueError, r"select_factor must be a number in \(0, 1\]"),
        (dict(stop_idx=-1), ValueError, r"stop_idx must be an integer >= 0"),
        (dict(clusters=0), ValueError, r"clusters must be an integer >= 1"),
        (dict(kmeans_iterations=1.5), TypeError, r"kmeans_iterations must be an integer >= 1"),
        (dict(cond_first="yes"), TypeError, r"cond_first must be True or False"),
    ],
)
def test_config_errors(config, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.apply(sd3().model, "cat_pruning", **config)
