"""One benchmark peer, run in its own process: python -m benchmarks.peers PEER --batch-size B ...

Every peer trains the same 784-128-10 MLP (glorot-uniform kernels, zero biases) with Adam(1e-3,
eps=1e-7) and sparse categorical cross-entropy on logits, on the same uint8 arrays from
fmnist_jax.data, and evaluates all 10,000 test images after every epoch (not timed). It prints one
JSON line: per-epoch training seconds and test accuracy, plus the peer's own compile time when it
has a separate one. benchmarks.run turns these into the report.
"""

import argparse
import json
import os
import sys
import time

PEERS = {
    # name: (framework, description)
    'fmnist_jax-device': ('jax', 'fmnist_jax, device mode: data resident, a whole epoch per '
                          'compiled call'),
    'fmnist_jax-stream': ('jax', 'fmnist_jax, stream mode: batches from host memory (numpy) '
                          'in chunks into the same compiled loop'),
    'fmnist_jax-tfds': ('jax', 'fmnist_jax, tfds mode: batches from tf.data in chunks into the '
                        'same compiled loop'),
    'keras-tf-tutorial': ('keras+tensorflow', 'Keras 3, TensorFlow backend, the tutorial code as '
                          'written (default fit)'),
    'keras-tf-tuned': ('keras+tensorflow', 'Keras 3, TensorFlow backend, jit_compile=True, '
                       'steps_per_execution=one epoch'),
    'keras-jax-tuned': ('keras+jax', 'Keras 3, JAX backend, steps_per_execution=one epoch'),
    'torch-eager': ('torch', 'PyTorch eager, same MLP and Adam, data in memory'),
    'torch-compile': ('torch', 'PyTorch with torch.compile on the model'),
}


CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                           'base.py')


def base_config():
  """configs/base.py's config, loaded by path (works whether or not configs/ is a package)."""
  try:
    from fmnist_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    return config_lib.load(CONFIG_FILE)
  except ImportError:
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location('fmnist_jax_bench_base_config', CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_arrays():
  from fmnist_jax import data  # pylint: disable=g-import-not-at-top
  return data.load(base_config().data)


def run_fmnist_jax(mode, batch_size, epochs, num_models=1):
  """fmnist_jax's own trainer (imported, not copied): per-epoch times from its metrics."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from fmnist_jax import loop  # pylint: disable=g-import-not-at-top
  config = base_config()
  config.input_mode = mode
  config.batch_size = batch_size
  config.num_epochs = epochs
  config.num_models = num_models
  config.progress = False
  config.tensorboard = False
  if 'compile_cache_dir' in config:
    config.compile_cache_dir = ''  # Every process compiles: throughput runs measure the same work.
  from fmnist_jax.run import outputs  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as workdir:
    summary = loop.train_and_evaluate(config, workdir)
    history = outputs.read_metrics(workdir)
  return {'epochs': [{'seconds': h['seconds'], 'test_accuracy': h['test_accuracy']}
                     for h in history],
          'compile_seconds': summary['compile_seconds'],
          'test_accuracy': summary['test_accuracy'], 'device': summary['device_kind']}


def run_keras(tuned, batch_size, epochs):
  """Keras 3 on the backend in $KERAS_BACKEND; `tuned`: XLA and one call per epoch."""
  import keras  # pylint: disable=g-import-not-at-top
  arrays = load_arrays()
  # The tutorial's preprocessing: float images in [0, 1].
  x_train = arrays['train']['image'] / 255.0
  x_test = arrays['test']['image'] / 255.0
  y_train, y_test = arrays['train']['label'], arrays['test']['label']
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((28, 28)), keras.layers.Flatten(),
      keras.layers.Dense(128, activation='relu'), keras.layers.Dense(10)])
  kwargs = {}
  if tuned:
    kwargs = dict(jit_compile=True, steps_per_execution=-(-len(y_train) // batch_size))
  model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-7),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=['accuracy'], **kwargs)
  epochs_out = []

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      seconds = time.perf_counter() - self.start
      _, accuracy = self.model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
      epochs_out.append({'seconds': seconds, 'test_accuracy': float(accuracy)})

  model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=0,
            callbacks=[Timer()])
  return {'epochs': epochs_out, 'test_accuracy': epochs_out[-1]['test_accuracy'],
          'device': keras.backend.backend()}


def run_torch(compiled, batch_size, epochs):
  """PyTorch: the same MLP and Adam; batches sliced from in-memory tensors."""
  import torch  # pylint: disable=g-import-not-at-top
  arrays = load_arrays()
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  x_train = torch.as_tensor(arrays['train']['image'], device=device)
  y_train = torch.as_tensor(arrays['train']['label'], device=device).long()
  x_test = torch.as_tensor(arrays['test']['image'], device=device)
  y_test = torch.as_tensor(arrays['test']['label'], device=device).long()
  model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10)).to(device)
  for layer in (model[1], model[3]):  # Keras's initialisation.
    torch.nn.init.xavier_uniform_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
  loss_fn = torch.nn.CrossEntropyLoss()
  forward = torch.compile(model) if compiled else model
  n = len(y_train)
  epochs_out = []
  for _ in range(epochs):
    start = time.perf_counter()
    model.train()
    for idx in torch.randperm(n, device=device).split(batch_size):
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(forward(x_train[idx].float() / 255.0), y_train[idx])
      loss.backward()
      optimizer.step()
    if device == 'cuda':
      torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
      correct = (forward(x_test.float() / 255.0).argmax(1) == y_test).sum().item()
    epochs_out.append({'seconds': seconds, 'test_accuracy': correct / len(y_test)})
  return {'epochs': epochs_out, 'test_accuracy': epochs_out[-1]['test_accuracy'],
          'device': device}


def run_peer(peer, batch_size, epochs, num_models=1):
  if peer.startswith('fmnist_jax-'):
    return run_fmnist_jax(peer.split('-', 1)[1], batch_size, epochs, num_models)
  if peer.startswith('keras-'):
    return run_keras(peer.endswith('-tuned'), batch_size, epochs)
  if peer.startswith('torch-'):
    return run_torch(peer == 'torch-compile', batch_size, epochs)
  raise ValueError(f'unknown peer {peer}')


def peer_env(peer):
  """Environment for the peer's process: Keras's backend, quiet TensorFlow."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  if peer.startswith('keras-'):
    env['KERAS_BACKEND'] = 'jax' if peer.startswith('keras-jax') else 'tensorflow'
  return env


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('peer', choices=sorted(PEERS))
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--num-models', type=int, default=1)
  args = parser.parse_args()
  result = run_peer(args.peer, args.batch_size, args.epochs, args.num_models)
  sys.stdout.flush()
  print('RESULT ' + json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
