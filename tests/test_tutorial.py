"""The tutorial pages as scripts: docs/tutorial.md (English) and docs/tutorial.ko.md (Korean).

Each page walks through the Keras "Basic classification" tutorial step by step. Its ```python
blocks, taken in order, are one script, as a reader pastes them into an IDE; the Keras excerpts are
```py blocks and are not run. The script runs from the root of a fresh clone with a newcomer's
environment (an empty home folder; TFDS_DATA_DIR, this session's prepared data; XDG_CACHE_HOME,
this session's compilation cache), must exit 0 without a traceback, write the figures it promises,
and, run again, report its finished run instead of training again. The pages' ```sh commands are
tests/test_readme.py's concern.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

STEPS = {
    'docs/tutorial.md': (
        'Import the libraries', 'Load Fashion-MNIST', 'Explore the data', 'Preprocess the data',
        'Build the model', 'Compile the model: loss, optimizer, metrics', 'Train the model',
        'Evaluate accuracy', 'Make predictions', 'Verify predictions', 'Use the trained model'),
    'docs/tutorial.ko.md': (
        '라이브러리 임포트하기', '패션 MNIST 데이터셋 임포트하기', '데이터 탐색', '데이터 전처리',
        '모델 구성', '모델 컴파일: 손실 함수, 옵티마이저, 지표', '모델 훈련', '정확도 평가',
        '예측 만들기', '예측 확인', '훈련된 모델 사용하기'),
}
WORKDIRS = {'docs/tutorial.md': 'workdirs/tutorial_en',
            'docs/tutorial.ko.md': 'workdirs/tutorial_ko'}
# The figures each script writes into <workdir>/figures/, as the page says.
FIGURES = ('train_image_first', 'train_grid_5x5', 'training_curves', 'prediction_0',
           'prediction_2', 'prediction_grid', 'confusion_matrix', 'single_prediction')
PNG = b'\x89PNG\r\n\x1a\n'


def blocks(text: str, language: str) -> list[str]:
  """The contents of the page's ```<language> blocks, in order."""
  return re.findall(rf'^```{language}\n(.*?)^```', text, flags=re.M | re.S)


def script(text: str) -> str:
  """The page's ```python blocks joined into one script."""
  return '\n'.join(blocks(text, 'python'))


def sections(text: str) -> dict[str, str]:
  """{'1. Import the libraries': its text, ...}: the page's level-2 sections."""
  parts = re.split(r'^## (.+)\n', text, flags=re.M)
  return dict(zip(parts[1::2], parts[2::2]))


def read(page: str) -> str:
  with open(os.path.join(ROOT, page), encoding='utf-8') as f:
    return f.read()


def test_blocks():
  text = '```py\nkeras()\n```\n```python\na = 1\n```\n```sh\ncmd\n```\n```python\nb = a\n```\n'
  assert script(text) == 'a = 1\n\nb = a\n'
  assert blocks(text, 'py') == ['keras()\n']
  assert list(sections('## 1. A\nx\n## 2. B\ny\n')) == ['1. A', '2. B']


@pytest.mark.parametrize('page', STEPS)
def test_page_names_every_step_in_order(page):
  """Every step of the tutorial is a numbered section, in the tutorial's order, with the Keras
  excerpt and the fmnist_jax code that does it."""
  found = sections(read(page))
  assert list(found) == [f'{i}. {step}' for i, step in enumerate(STEPS[page], 1)]
  for heading, body in found.items():
    assert blocks(body, 'py'), f'{page}: "{heading}" has no Keras excerpt'
    assert blocks(body, 'python'), f'{page}: "{heading}" has no fmnist_jax code'
  assert not re.search(r'\btf\.|tensorflow', script(read(page)))  # Keras stays in the excerpts.


@pytest.mark.parametrize('page', STEPS)
def test_page_shows_committed_figures_and_links_the_other_page(page):
  text = read(page)
  shown = re.findall(r'!\[[^\]]*\]\(figures/([\w.]+)\)', text)
  assert sorted(shown) == sorted(f'{name}.png' for name in FIGURES)
  for name in shown:
    with open(os.path.join(ROOT, 'docs', 'figures', name), 'rb') as f:
      assert f.read(8) == PNG, name
  other = {'docs/tutorial.md': 'tutorial.ko.md', 'docs/tutorial.ko.md': 'tutorial.md'}[page]
  assert f']({other})' in text
  assert 'python -m fmnist_jax.train --config configs/base.py' in text  # The full run.
  assert f"WORKDIR = '{WORKDIRS[page]}'" in script(text)


@pytest.mark.slow
@pytest.mark.parametrize('page', STEPS)
def test_page_runs_as_one_script_in_a_fresh_clone(page, data_dir, tmp_path):
  clone = tmp_path / 'clone'
  subprocess.run(['git', 'clone', '-q', ROOT, str(clone)], check=True)
  home = tmp_path / 'home'
  home.mkdir()
  env = {k: v for k, v in os.environ.items() if not k.startswith(('VIRTUAL_ENV', 'PYTHON'))}
  env.update(HOME=str(home), TFDS_DATA_DIR=data_dir)
  with open(clone / page, encoding='utf-8') as f:
    code = script(f.read())

  def run():
    # `python -c` puts the current folder first on sys.path, as `python tutorial.py` run from
    # the root does: the clone's own fmnist_jax is imported.
    result = subprocess.run([sys.executable, '-c', code], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert 'Traceback' not in output, output[-6000:]
    return result.stdout

  first = run()
  assert 'Epoch 1/1' in first and 'Test accuracy:' in first, first[-3000:]
  figures = clone / WORKDIRS[page] / 'figures'
  for name in FIGURES:
    with open(figures / f'{name}.png', 'rb') as f:
      assert f.read(8) == PNG, name
  again = run()  # A reader runs the script again: the finished run is reported, not retrained.
  assert 'holds a finished run' in again and 'Epoch 1/1' not in again, again[-3000:]
  status = subprocess.run(['git', 'status', '--porcelain'], cwd=clone, capture_output=True,
                          text=True, check=True).stdout
  assert not status.strip(), status
