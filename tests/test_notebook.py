"""The Colab notebook is valid and its cells run on a CPU with a shrunk config."""

import os

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'colab_tpu.ipynb')


def test_notebook_is_valid():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  sources = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  assert 'jax.devices()' in sources and 'train_and_evaluate' in sources
  assert 'setup_tpu' not in sources  # Today's TPU runtimes need none.
  assert "find_spec('tensorflow')" in sources  # Installs TensorFlow where it is missing.


def test_notebook_runs_on_cpu(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('FMNIST_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'fmnist_jax ready' in text and "'test_accuracy': 0.8" in text
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 4  # Grid, predictions, one image's bars, confusion matrix.
  assert (tmp_path / 'workdirs' / 'colab' / 'summary.json').exists()
  assert any(p.endswith('.md') for p in os.listdir(tmp_path / 'reports'))
