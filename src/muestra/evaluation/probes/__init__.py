"""Free-text bias probes: templates that differ only in a group word, sampled many times,
each continuation scored, group differences tested within each template.

A probe is a TOML file (shipped ones: `muestra probe --list`):

    name = "occupations-en"
    seed = 7
    samples = 40                      # per template and group
    language = "en"                   # en | es: lemmas and phrase rules
    mode = "raw"                      # raw: the template as plain text, continued;
                                      # chat: `instruction` as a user message
    groups = [                        # each group's words fill the templates' slots
      { id = "man", group = "man" },  # Spanish agreement: { id = "mujer", el = "La",
      { id = "woman", group = "woman" },  #   grupo = "mujer", o = "a" }
    ]
    templates = ["The {group} worked as", { id = "job", text = "The {group} had a job as" }]
    [decoding]                        # every sampling setting, recorded with the run
    temperature = 1.0
    max_tokens = 16
    stop = ["\\n"]
    [lexicon]
    files = ["occupations-en"]        # shipped lexicons or TOML/JSON/TXT files
    [extraction]
    max_words = 3                     # the first phrase after the template
    [stop]                            # optional: sample each template × group in rounds
    score = "lexicon:female"          #   until this score's anytime-valid band is settled
    precision = 0.05                  #   (and/or reference = 0.5; compare = ["man", "woman"])
    [judge]                           # optional: a model answers a schema per continuation
    model = "..."                     # default: the probed model
    user = "Text: {text}\\n..."         # {prompt}, {continuation}, {text} = both
    schema = { ... }                  # inline, or a file beside the probe

`run_probe` samples through the experiment runner (the same store, resumable, seeds per
sample: an experiment whose prompt items are template × group, `group` = template id and
`variant` = group id), writes the probe's own record (table `probes`), then the
model-free scores (`score_store`: lexicon counts, extracted phrase and its category)
into each sample's `scores_json`. `judge_store` runs the judge as an experiment of its
own (one greedy structured answer per continuation, with exact `field_probs`) and copies
each answer and its probabilities into the judged sample's scores.

Modules: `schema` (the probe file's models), `loading` (files, lexicons, the judge
schema), `running` (the experiment, the scores, the judge), `reading` (a run read back
and its tables).
"""

from muestra.evaluation.probes.loading import (
    check_probe_stop,
    load_probe,
    read_lexicon,
    resolve_probe,
    shipped_lexicons,
    shipped_probes,
    with_probe_stop,
)
from muestra.evaluation.probes.reading import (
    probe_of_run,
    probe_sections,
    read_probe,
    side_by_side,
)
from muestra.evaluation.probes.running import (
    continuation,
    copy_judgements,
    experiment,
    judge_spec,
    judge_store,
    run_probe,
    sample_scores,
    score_store,
)
from muestra.evaluation.probes.schema import (
    DATA,
    Decoding,
    ExtractionSpec,
    JudgeSpec,
    LexiconSpec,
    Probe,
    ProbeGroup,
    ProbeSpec,
    ProbeStop,
    ProbeTemplate,
    WordsSpec,
)

__all__ = [
    "DATA",
    "Decoding",
    "ExtractionSpec",
    "JudgeSpec",
    "LexiconSpec",
    "Probe",
    "ProbeGroup",
    "ProbeSpec",
    "ProbeStop",
    "ProbeTemplate",
    "WordsSpec",
    "check_probe_stop",
    "continuation",
    "copy_judgements",
    "experiment",
    "judge_spec",
    "judge_store",
    "load_probe",
    "probe_of_run",
    "probe_sections",
    "read_lexicon",
    "read_probe",
    "resolve_probe",
    "run_probe",
    "sample_scores",
    "score_store",
    "shipped_lexicons",
    "shipped_probes",
    "side_by_side",
    "with_probe_stop",
]
