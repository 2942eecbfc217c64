"""The TensorFlow "Basic classification" tutorial, in JAX.

Flatten -> Dense(128, relu) -> Dense(10) on Fashion-MNIST, Adam(1e-3, eps=1e-7), sparse categorical
cross-entropy, 5 epochs at batch 32 (1,875 steps per epoch), evaluated on all 10,000 test images.

Command:
    python -m fmnist_jax.train --config configs/base.py --workdir workdirs/base

Expected result: test accuracy 0.86-0.88 (the tutorial reports about 0.88; measured: 0.8728 with
jax 0.10.2, 0.8678 with jax 0.12.0.1, whose XLA rounds differently), in about 2.5 s of training
on a 2-core CPU, plus about 3 s of compilation.

This file is the only home for defaults: the trainer reads every field and adds none of its own.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration."""
  config = ml_collections.ConfigDict()

  config.seed = 0  # Seeds parameter init, data order and everything random.

  # Data (fmnist_jax/data/).
  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ''  # tfds data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  # Folder with the four IDX .gz files for offline preparation; '' = $FMNIST_JAX_MANUAL_DIR, then
  # Debian's /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist).
  config.data.manual_dir = ''
  config.data.download = True  # Without local IDX files, let tfds download (needs a network).
  config.data.shuffle_buffer = 60_000  # tfds input mode: tf.data shuffle buffer (full shuffle).

  # Model (fmnist_jax/model.py).
  config.model = 'mlp'  # The only model: flatten -> dense layers -> logits.
  config.hidden_sizes = (128,)  # Hidden Dense(relu) layers; (128,) is the tutorial's.
  config.num_classes = 10

  # Optimizer: Adam with Keras's defaults.
  config.optimizer = 'adam'
  config.learning_rate = 1e-3
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-7  # Keras's epsilon (optax's default is 1e-8).

  # Training.
  config.num_epochs = 5
  config.batch_size = 32  # Global batch; Keras's default. 60,000 / 32 = 1,875 steps per epoch.
  config.eval_batch_size = 1000  # Test-set batch; the last one is padded and masked, never dropped.
  # 'device': uint8 data resident on the accelerator, shuffled there, many steps per compiled call.
  # 'stream': batches streamed from host memory (numpy, no TensorFlow) into the same fused loop.
  # 'tfds': the same, with batches from the classic tf.data pipeline.
  config.input_mode = 'device'
  # Steps between host-side checks (progress line, stop signals); 0 = once per epoch.
  config.check_every_steps = 0
  config.stream_chunk_steps = 256  # stream/tfds modes: batches per transfer and compiled call.
  config.compute_dtype = 'float32'  # 'bfloat16' computes in bf16, keeps f32 params and Adam state.
  config.num_models = 1  # >1 trains that many independent models at once with jax.vmap.
  config.learning_rates = ()  # With num_models > 1: one learning rate per model; () = all equal.

  # Checkpoints, resume and outputs (fmnist_jax/run/checkpoint.py).
  config.checkpoint_every_steps = 0  # 0 = at the end of every epoch.
  config.max_checkpoints_to_keep = 2
  config.tensorboard = True  # Write TensorBoard event files to the workdir.
  config.progress = True  # Print a Keras-like progress line per epoch.
  # JAX's persistent compilation cache: 'auto' = ~/.cache/fmnist_jax/jax (or $XDG_CACHE_HOME's);
  # '' = off. A repeated or slightly changed run then skips most compilation.
  config.compile_cache_dir = 'auto'
  # Trace this many steady-state training steps with jax.profiler into <workdir>/tensorboard
  # (TensorBoard's profile plugin or Perfetto read it); 0 = off.
  config.profile_steps = 0

  # Several hosts (fmnist_jax/distributed.py): '' = read the standard environment (or none).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ''
  config.distributed.num_processes = 0  # 0 = single process unless the environment says so.
  config.distributed.process_id = -1

  return config
