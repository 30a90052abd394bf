"""The mini world: a CLIP and a DINO trained by this project on Fashion-MNIST, and shifted
target domains built from its test split, so that accuracy figures on this machine mean
something (a miniature of the papers' setting, not their numbers). See docs/mini_world.md."""
