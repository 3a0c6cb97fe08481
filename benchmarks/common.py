"""Helpers shared by the benchmarks: timing, the seed 000 prompt, result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Seed 000's experiment, as written in the notebook.
SEED_000_SYSTEM = """Eres un experto en juegos de rol y sabes mucho sobre generos de fantasía y ciencia ficción.
Los usuarios comienzan la partida acudiendo a ti para construir su personaje dándote una descripción de ellos mismos.
Debes prestar atención a los detalles y crear un nuevo personaje para ellos. En este universo los personajes reciben
un nombre corto, una edad que está entre los 18 y los 100 años y un sexo (masculino o femenino).
Asignarás una de estas tres clases a cada usuario: Tanque, Soporte o Guerrero.
Por último, debes dar un nivel inicial de entre 1 y 10 para que el inicio de partida sea justo.
Tu tarea es generar siempre un JSON con la siguiente estructura:
```
{
  "nombre": str,
  "sexo": str,
  "edad": int,
  "clase": str,
  "nivel": int,
}
```"""
SEED_000_DESCRIPTION_1 = (
    "Soy una persona fuerte, con mucho carisma y dotes de liderazgo."
    "Cuando enfrento un problema lo hago de frente, porque mi valor puede vencer cualquier cosa."
    " En la lucha no tengo rival: jamás he conocido la derrota."
)
SEED_000_USER_1 = f"Genera un personaje para la siguiente descripción:\n<{SEED_000_DESCRIPTION_1}>"


def seed_000_messages() -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SEED_000_SYSTEM},
        {"role": "user", "content": SEED_000_USER_1},
    ]


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


def write_result(name: str, data: dict[str, Any], merge: bool = False) -> Path:
    """Write `results/NAME.json`; with `merge`, keep the entries this run did not measure."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    previous = json.loads(path.read_text("utf-8")) if merge and path.is_file() else {}
    merged = {**previous, "machine": machine(), **data}
    path.write_text(json.dumps(merged, indent=2) + "\n", "utf-8")
    return path
