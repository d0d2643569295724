"""DALL-E step by step on the built-in shapes dataset: data -> VAE -> DALLE -> generation -> CLIP reranking.

Tiny sizes and short training, so it runs in a few minutes on a laptop CPU and the pictures are rough;
`dalle-demo` runs the same pipeline with bigger budgets and measures how often the samples show what the
prompts asked for. Run it as a script (`python examples/walkthrough.py`) or open walkthrough.ipynb, which
holds the same cells. Everything it writes goes to outputs/walkthrough/.
"""

# %% [markdown]
# ## 1. Data: coloured shapes with captions
# `ShapesDataset` renders 32x32 images on the fly. The `'train'` split leaves out one shape per colour
# (red circles, orange squares, ...), so we can later ask for pairs the model has never seen.

# %%
from pathlib import Path

import torch

from dalle_pytorch import CLIP, DALLE, DiscreteVAE
from dalle_pytorch.data.shapes import ShapesDataset, heldout_pairs
from dalle_pytorch.demo.pipeline import build_word_tokenizer, make_grid

torch.manual_seed(0)
out_dir = Path("outputs/walkthrough")
dataset = ShapesDataset(num_samples=2000, split="train", image_size=32, seed=0)
captions = [dataset[i][0] for i in range(len(dataset))]
images = torch.stack([dataset[i][1] for i in range(len(dataset))])  # (2000, 3, 32, 32) in [0, 1]
print(captions[:4])
print("held out:", heldout_pairs())

# %% [markdown]
# ## 2. Text tokens: one token per word
# The captions use some 25 words, so a word-level tokenizer is enough. Id 0 is padding.

# %%
tokenizer = build_word_tokenizer(captions, out_dir / "tokenizer.json")
text_seq_len = 8
text = tokenizer.tokenize(captions, context_length=text_seq_len)  # (2000, 8) long
print(tokenizer.vocab_size, "tokens;", captions[0], "->", text[0].tolist())

# %% [markdown]
# ## 3. Image tokens: a discrete VAE
# Two stride-2 layers turn a 32x32 image into an 8x8 grid of codes out of 128. The Gumbel-softmax
# temperature is annealed towards 1/16, and a small KL-to-uniform term keeps many codes in use.

# %%
vae = DiscreteVAE(
    image_size=32, num_layers=2, num_tokens=128, codebook_dim=32, hidden_dim=32, kl_div_loss_weight=0.01
)
optimiser = torch.optim.Adam(vae.parameters(), lr=3e-3)
vae_steps = 400
for step in range(vae_steps):
    batch = images[torch.randint(0, len(images), (32,))]
    loss = vae(batch, return_loss=True, temp=(1 / 16) ** (step / vae_steps))
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    if step % 100 == 0:
        print(f"VAE step {step}: loss {loss.item():.4f}")
vae.eval()
codes = torch.cat([vae.get_codebook_indices(chunk) for chunk in images.split(256)])  # (2000, 64) long
reconstructions = vae.decode(codes[:8]).clamp(0, 1)  # (8, 3, 32, 32)

# %% [markdown]
# ## 4. DALLE: a transformer over [caption tokens | image codes]
# The image codes are computed once above; DALLE also accepts them directly instead of pixels.
# `null_cond_prob` drops the caption from 20% of the samples, which makes classifier-free guidance possible.

# %%
dalle = DALLE(
    dim=128, vae=vae, num_text_tokens=tokenizer.vocab_size, text_seq_len=text_seq_len, depth=2, heads=4, dim_head=32
)
params = [p for p in dalle.parameters() if p.requires_grad]  # the VAE inside is frozen
optimiser = torch.optim.AdamW(params, lr=1e-3)
for step in range(400):
    index = torch.randint(0, len(codes), (32,))
    loss = dalle(text[index], codes[index], return_loss=True, null_cond_prob=0.2)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    if step % 100 == 0:
        print(f"DALLE step {step}: loss {loss.item():.4f}")

# %% [markdown]
# ## 5. Generation, including a pair that was never in the training data
# `cond_scale` > 1 is classifier-free guidance; `filter_thres` is top-k (the fraction of codes dropped).

# %%
prompts = ["a big filled blue square", "a big filled red circle"]  # red circles were held out
prompt_ids = tokenizer.tokenize([p for p in prompts for _ in range(8)], context_length=text_seq_len)
generators = [torch.Generator().manual_seed(i) for i in range(len(prompt_ids))]
samples = dalle.generate_images(prompt_ids, cond_scale=2.0, filter_thres=0.5, generator=generators)
samples = samples.clamp(0, 1)  # (16, 3, 32, 32)

# %% [markdown]
# ## 6. CLIP reranking
# A small CLIP learns which caption goes with which image; among several samples for one prompt it picks
# the ones that match best.

# %%
clip = CLIP(
    dim_text=64, dim_image=64, dim_latent=64, num_text_tokens=tokenizer.vocab_size, text_enc_depth=1,
    text_seq_len=text_seq_len, text_heads=4, visual_enc_depth=2, visual_heads=4, visual_image_size=32,
    visual_patch_size=4,
)  # fmt: skip
optimiser = torch.optim.AdamW(clip.parameters(), lr=1e-3)
for _ in range(200):
    index = torch.randint(0, len(images), (64,))
    loss = clip(text[index], images[index], return_loss=True)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
clip.eval()
with torch.no_grad():
    scores = clip(prompt_ids, samples)  # (16,) similarity of each sample to its prompt
best = scores.view(len(prompts), 8).argsort(dim=1, descending=True)[:, :3]  # top 3 per prompt
print("CLIP's favourites per prompt:", best.tolist())

# %% [markdown]
# ## 7. Look at the results

# %%
rows = [("ground truth", images[:8]), ("VAE reconstruction", reconstructions)]
rows += [(prompt, samples[8 * i : 8 * i + 8]) for i, prompt in enumerate(prompts)]
rows += [(f"CLIP's top 3: {prompt}", samples[8 * i + best[i]]) for i, prompt in enumerate(prompts)]
out_dir.mkdir(parents=True, exist_ok=True)
make_grid(rows).save(out_dir / "walkthrough.png")
print(f"wrote {out_dir / 'walkthrough.png'}")
