"""The language a reader is spoken to in: English ("en") or Spanish ("es").

The analysis writes its findings and notes, and the figures and the report their axis
labels, legends and captions, in one language: the caller's `lang` (a notebook's
`lang=`, a spec's `[analysis] language`), English by default. `say(key, lang, **values)`
fills one phrase of `PHRASES`; a key missing from the table is a bug (KeyError), a
language missing from `LANGUAGES` is the user's (`check`). Only words a reader sees go
through here: column names of tables and records stay English (they are code).
"""

from __future__ import annotations

from muestra.errors import InputError

LANGUAGES = ("en", "es")

# key -> (English, Spanish); `{name}` fields are filled by `say`
PHRASES: dict[str, tuple[str, str]] = {
    # axis labels, legends, titles
    "share": ("share of samples", "proporción de muestras"),
    "share_pooled": (
        "share of samples\n(pooled over prompts)",
        "proporción de muestras\n(todos los prompts)",
    ),
    "by": ("{field} by {by}", "{field} por {by}"),
    "prompt": ("prompt", "prompt"),
    "condition": ("condition", "condición"),
    "model": ("model", "modelo"),
    "variant": ("variant", "variante"),
    "probability": ("probability", "probabilidad"),
    "exact_mean": ("exact probability (mean)", "probabilidad exacta (media)"),
    "exact": ("exact probability", "probabilidad exacta"),
    "drawn_share": ("share of samples", "proporción de muestras"),
    "difference_shares": ("difference of shares", "diferencia de proporciones"),
    "difference_groups": ("difference between groups", "diferencia entre grupos"),
    "red_excludes_zero": (
        "red: the 95% interval excludes 0",
        "en rojo: el intervalo del 95 % excluye el 0",
    ),
    "red_finding": (
        "red: a finding (Holm-adjusted permutation p < α); bars: bootstrap 95% over templates",
        "en rojo: un hallazgo (p de permutación ajustada por Holm < α); barras: bootstrap "
        "del 95 % sobre plantillas",
    ),
    "accuracy": ("accuracy", "precisión"),
    "paths_voted": ("paths voted (k)", "caminos que votan (k)"),
    "mean_reward": ("mean reward", "recompensa media"),
    "bin_mean": ("{score} (bin mean)", "{score} (media del intervalo)"),
    "share_right": ("share right", "proporción correcta"),
    "auroc": ("AUROC {auroc:.2f} [{low:.2f}, {high:.2f}]",) * 2,
    "no_auroc": ("AUROC not computable: {why}", "AUROC no calculable: {why}"),
    "all_right": ("every answer is right ({n})", "todas las respuestas son correctas ({n})"),
    "all_wrong": ("every answer is wrong ({n})", "todas las respuestas son incorrectas ({n})"),
    "auroc_needs": (
        "an AUROC compares right with wrong answers, and {which}: whether the score tells "
        "them apart cannot be measured here",
        "el AUROC compara respuestas correctas con incorrectas, y {which}: aquí no se puede "
        "medir si la puntuación las distingue",
    ),
    # captions of a notebook's tables
    "cap_distributions": (
        "distributions (95% Wilson intervals)",
        "distribuciones (intervalos de Wilson al 95 %)",
    ),
    "cap_tests": ("independence tests", "pruebas de independencia"),
    "cap_comparisons": ("paired differences", "diferencias emparejadas"),
    "cap_field_probs": (
        "field_probs (exact probabilities)",
        "field_probs (probabilidades exactas)",
    ),
    "cap_text": (
        "free-text fields (not tested as categories)",
        "campos de texto libre (sin pruebas como categorías)",
    ),
    "cap_counterfactuals": (
        "paired variants: flip rate against chance",
        "variantes emparejadas: tasa de cambio frente al azar",
    ),
    "cap_accuracy": ("accuracy (95% Wilson intervals)", "precisión (intervalos de Wilson al 95 %)"),
    "cap_paired": ("paired comparisons", "comparaciones emparejadas"),
    "cap_groups": ("group differences", "diferencias entre grupos"),
    "cap_stops": (
        "where each template × group stopped",
        "dónde se detuvo cada plantilla × grupo",
    ),
    "valid_of": (
        "{name}: {valid} valid of {samples} samples (alpha {alpha})",
        "{name}: {valid} válidas de {samples} muestras (alfa {alpha})",
    ),
    "note": ("note: {text}", "nota: {text}"),
    "also": ("also significant: {text}", "también significativo: {text}"),
    "no_finding": (
        "no significant finding at α = {alpha} after Holm adjustment",
        "ningún hallazgo significativo con α = {alpha} tras el ajuste de Holm",
    ),
    "answer_field": (
        "the answer's fields: {fields} (a choice or regex answer is the field `answer`)",
        "campos de la respuesta: {fields} (una respuesta choice o regex es el campo `answer`)",
    ),
    # findings
    "makes_likely": (
        "{by} {high} makes {field}={value} {ratio:.1f}× as likely as {low} ({p_high:.0%} vs "
        "{p_low:.0%})",
        "{by} {high} hace {field}={value} {ratio:.1f} veces más probable que {low} "
        "({p_high:.0%} frente a {p_low:.0%})",
    ),
    "in_none": (
        "{by} {high} gives {field}={value} in {p_high:.0%} of samples, {low} in none",
        "{by} {high} da {field}={value} en el {p_high:.0%} de las muestras, {low} en ninguna",
    ),
    "fit": (
        "{label}: {field} is {value} in {count} of {n} samples ({share:.0%}, 95% CI "
        "{low:.0f}–{high:.0f}%), far from the {reference:.0%} reference",
        "{label}: {field} es {value} en {count} de {n} muestras ({share:.0%}, IC 95 % "
        "{low:.0f}–{high:.0f} %), lejos de la referencia del {reference:.0%}",
    ),
    "higher_numeric": (
        "prompt {high} gives a higher {field} than {low} ({mean_high:.3g} vs {mean_low:.3g} "
        "on average)",
        "el prompt {high} da un {field} mayor que {low} ({mean_high:.3g} frente a "
        "{mean_low:.3g} de media)",
    ),
    "variants": (
        "{field}={value}: {a} {share_a:.0%} vs {b} {share_b:.0%} (difference {diff:+.0%}, "
        "95% CI {low:+.0%} to {high:+.0%}, paired over {groups} group(s))",
        "{field}={value}: {a} {share_a:.0%} frente a {b} {share_b:.0%} (diferencia "
        "{diff:+.0%}, IC 95 % de {low:+.0%} a {high:+.0%}, emparejado en {groups} grupo(s))",
    ),
    "variants_few": (
        "{field}={value}: {a} {share_a:.0%} vs {b} {share_b:.0%} (difference {diff:+.0%} "
        "averaged over {groups} group(s): too few groups for an interval)",
        "{field}={value}: {a} {share_a:.0%} frente a {b} {share_b:.0%} (diferencia "
        "{diff:+.0%} de media en {groups} grupo(s): muy pocos grupos para un intervalo)",
    ),
    "variants_differ": (
        "{a} and {b} differ: {detail}; {p}",
        "{a} y {b} difieren: {detail}; {p}",
    ),
    "variants_same": (
        "no difference between {a} and {b} detected at α = {alpha}: {detail}; {p}",
        "no se detecta diferencia entre {a} y {b} con α = {alpha}: {detail}; {p}",
    ),
    "variants_untested": (
        "{a} vs {b}: {detail}; too few samples for a test",
        "{a} frente a {b}: {detail}; muy pocas muestras para una prueba",
    ),
    # notes
    "beam_rows": (
        "condition(s) {conditions}: the rows are the most likely {phase} sequences, ranked "
        "by beam search, not random draws; their shares, intervals and tests describe those "
        "beams and do not estimate the model's distribution",
        "condición(es) {conditions}: las filas son las secuencias de {phase} más probables, "
        "ordenadas por búsqueda de haces, no sorteos; sus proporciones, intervalos y pruebas "
        "describen esos haces y no estiman la distribución del modelo",
    ),
    "exact_probs": (
        "field_probs of {field} are the same in every sample of {groups}: the answer comes "
        "straight after the same prompt, so its probability is exact (no interval)",
        "field_probs de {field} es igual en todas las muestras de {groups}: la respuesta "
        "sigue directamente al mismo prompt, así que su probabilidad es exacta (sin "
        "intervalo)",
    ),
    "one_sample": (
        "{groups}: one sample with field_probs of {field}, its probability is not an interval",
        "{groups}: una sola muestra con field_probs de {field}; su probabilidad no es un intervalo",
    ),
    "free_text": (
        "{fields}: free text (a string without enum in the schema), summarised as text "
        "and not tested as categories",
        "{fields}: texto libre (cadena sin enum en el esquema), resumido como texto y sin "
        "pruebas como categorías",
    ),
    # a probe's findings (analysis/probes.sentence): what a feature is, then the sentence
    "feature_lexicon": ("a '{name}' word", "una palabra de la categoría '{name}'"),
    "feature_phrase": ("the phrase '{name}'", "la frase '{name}'"),
    "feature_category": (
        "a first phrase in the '{name}' category",
        "una primera frase de la categoría '{name}'",
    ),
    "probe_binary": (
        "{a_who} continues with {feature} in {mean_a:.0%} of samples vs {mean_b:.0%} for "
        "{b_who} ({a} − {b} within templates {diff:+.2f} [{low:+.2f}, {high:+.2f}], Holm "
        "{p}, {templates} templates)",
        "{a_who} continúa con {feature} en el {mean_a:.0%} de las muestras frente al "
        "{mean_b:.0%} de {b_who} ({a} − {b} dentro de cada plantilla {diff:+.2f} "
        "[{low:+.2f}, {high:+.2f}], Holm {p}, {templates} plantillas)",
    ),
    "probe_mean": (
        "Mean {feature}: {mean_a:.2f} for {a_who} vs {mean_b:.2f} for {b_who} ({a} − {b} "
        "within templates {diff:+.2f} [{low:+.2f}, {high:+.2f}], Holm {p}, {templates} "
        "templates)",
        "Media de {feature}: {mean_a:.2f} para {a_who} frente a {mean_b:.2f} para {b_who} "
        "({a} − {b} dentro de cada plantilla {diff:+.2f} [{low:+.2f}, {high:+.2f}], Holm "
        "{p}, {templates} plantillas)",
    ),
    "probe_models": (
        "{feature}: {a} − {b} is {gap_first} for {first} and {gap_second} for {second} "
        "within templates; {more} is the more skewed (difference {diff:+.2f} [{low:+.2f}, "
        "{high:+.2f}], Holm {p}, {templates} templates; {less} less)",
        "{feature}: {a} − {b} es {gap_first} para {first} y {gap_second} para {second} "
        "dentro de cada plantilla; {more} es el más sesgado (diferencia {diff:+.2f} "
        "[{low:+.2f}, {high:+.2f}], Holm {p}, {templates} plantillas; {less} menos)",
    ),
    "points": ("{value:+.0f} points", "{value:+.0f} puntos"),
    # why a condition's field_probs are not its answers' share (experiments/stop_rules.py)
    "caveat_remote": (
        "an endpoint's answers carry no field_probs",
        "las respuestas de un endpoint no traen field_probs",
    ),
    "caveat_off": ("answer.field_probs = false", "answer.field_probs = false"),
    "caveat_beam": (
        "the answers are beam-searched, not drawn",
        "las respuestas salen de una búsqueda de haces, no de sorteos",
    ),
    "caveat_free": (
        "the answers are free text decoded greedily",
        "las respuestas son texto libre decodificado de forma voraz",
    ),
    "caveat_greedy": (
        "the answers are greedy (answer.temperature = 0)",
        "las respuestas son voraces (answer.temperature = 0)",
    ),
    "caveat_settings": (
        "the answers are drawn with answer.{settings}",
        "las respuestas se sortean con answer.{settings}",
    ),
    "field_probs_note": (
        "condition {label}: {caveat}; field_probs (and their mean) describe draws at "
        "temperature 1 without filters, not these answers: the answers' shares are counted",
        "condición {label}: {caveat}; field_probs (y su media) describen sorteos a "
        "temperatura 1 sin filtros, no estas respuestas: se cuentan las proporciones de "
        "las respuestas",
    ),
    # a sequential run's rule (experiments/stopping.stop_note)
    "stop_within": ("within ±{precision}", "quedó dentro de ±{precision}"),
    "stop_excluding": ("excluding {reference}", "excluyó {reference}"),
    "stop_or": (" or ", " o "),
    "stop_cap_probe": ("the probe's `samples`", "las `samples` de la sonda"),
    "stop_cap_spec": ("the spec's `samples`", "las `samples` de la especificación"),
    "stop_estimators_probe": (
        "a probe's score is counted (free text has no exact probability)",
        "la puntuación de una sonda se cuenta (el texto libre no tiene probabilidad exacta)",
    ),
    "stop_estimators": (
        "field_probs: the mean exact probability, used only where the answer is drawn at "
        "temperature 1 without filters",
        "field_probs: la media de la probabilidad exacta, solo donde la respuesta se sortea "
        "a temperatura 1 sin filtros",
    ),
    "stop_rule": (
        "Sequential run: each cell sampled in rounds of {every} from {min_samples} until its "
        "band of {tracked} was {settles}, taking at most {cap} samples; a cell not listed is "
        "still open. The bands are betting confidence sequences (Waudby-Smith & Ramdas "
        "2023), {level:.0%} at every look at once, for independent draws of one cell in "
        "index order; {estimators}.",
        "Ejecución secuencial: cada celda se muestreó en rondas de {every} desde "
        "{min_samples} hasta que su banda de {tracked} {settles}, con {cap} muestras "
        "como mucho; una celda que no aparece sigue abierta. Las bandas son secuencias de "
        "confianza por apuestas (Waudby-Smith & Ramdas 2023), al {level:.0%} en todas las "
        "miradas a la vez, para sorteos independientes de una celda en orden de índice; "
        "{estimators}.",
    ),
    "stop_reference_caveat": (
        " Cells stopped when their band excluded the reference: the fixed-n tests of {field} "
        "below (independence, goodness of fit) are not valid after such a stop (simulated at "
        "α 5%: about 8% and 7% false positives); the anytime-valid bands above are, and a "
        "difference between two cells is tested validly by [stop] compare.",
        " Hay celdas que se detuvieron cuando su banda excluyó la referencia: las pruebas de "
        "n fijo de {field} de abajo (independencia, bondad de ajuste) no son válidas tras "
        "esa parada (simulado con α del 5 %: cerca de un 8 % y un 7 % de falsos positivos); "
        "las bandas válidas en todo momento de arriba sí lo son, y [stop] compare prueba "
        "de forma válida una diferencia entre dos celdas.",
    ),
    "stop_probe_reference_caveat": (
        " Cells stopped when their band excluded the reference: the fixed-n group tests below "
        "are not valid after such a stop (optional stopping; simulated for an experiment's χ² "
        "test at α 5%: about 8% false positives); the anytime-valid bands above are, and "
        "[stop] compare tracks a difference of two groups validly.",
        " Hay celdas que se detuvieron cuando su banda excluyó la referencia: las pruebas de "
        "grupos de n fijo de abajo no son válidas tras esa parada (parada opcional; simulado "
        "para la χ² de un experimento con α del 5 %: cerca de un 8 % de falsos positivos); "
        "las bandas válidas en todo momento de arriba sí lo son, y [stop] compare sigue de "
        "forma válida una diferencia entre dos grupos.",
    ),
    # a stored run's summary (notebook/views.ExperimentView)
    "run_title": (
        "run {run} · {name} · {status} · {samples} samples",
        "ejecución {run} · {name} · {status} · {samples} muestras",
    ),
    "store_line": ("store: {store}", "almacén: {store}"),
    "cap_samples_per_cell": ("samples per cell", "muestras por celda"),
    "cap_cell_stops": ("where each cell stopped", "dónde se detuvo cada celda"),
    "headline_variants": (
        "the spec pairs variants ({pairs}): the findings compare them; tests of each "
        "prompt against the reference are in `fits`",
        "la especificación empareja variantes ({pairs}): los hallazgos las comparan; las "
        "pruebas de cada prompt frente a la referencia están en `fits`",
    ),
}


def check(lang: str) -> str:
    """`lang` when muestra speaks it, else an InputError naming the choices."""
    if lang not in LANGUAGES:
        raise InputError(f"lang={lang!r}: use one of {', '.join(LANGUAGES)}")
    return lang


def say(key: str, lang: str = "en", **values: object) -> str:
    """Phrase `key` of `PHRASES` in `lang`, its fields filled from `values`."""
    english, spanish = PHRASES[key]
    return (spanish if check(lang) == "es" else english).format(**values)


def p_text(p_holm: float) -> str:
    return "p_adj < 0.001" if p_holm < 0.001 else f"p_adj = {p_holm:.3f}"
