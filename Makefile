.PHONY: setup run bench-demo test test-unit test-integration lint format speed paper-claim

setup:
	scripts/setup.sh

# The main job on the embedded defaults: embedded Redis, learner worker and API server
# together; posts two classes of the bundled CIFAR-10 subset and prints predictions.
run: setup
	.venv/bin/python scripts/demo.py

# A short offline protocol run on the bundled CIFAR-10 subset (progress bar and table).
bench-demo: setup
	.venv/bin/python -m learner.bench --protocol cifar10-subset-b0-s5 --epochs 4 --out runs/demo

# Every test: unit and integration (the `integration` marker, pyproject.toml).
test: setup
	scripts/ensure_redis.sh
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/pytest -q

# The fast unit tests only: no Redis, learner worker or server needed.
test-unit: setup
	.venv/bin/pytest -q -m "not integration"

# The integration tests only: Redis, learner workers, `bentoml serve`, real-data training.
test-integration: setup
	scripts/ensure_redis.sh
	.venv/bin/pytest -q -m integration

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

speed: setup
	.venv/bin/python -m learner.speed

paper-claim: setup
	scripts/paper_claim.sh
