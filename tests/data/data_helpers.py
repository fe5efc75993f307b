"""Small synthetic texts shared by the data-layer tests."""

TEXTS = {
    "alpha.txt": "The quick brown fox jumps over the lazy dog.\nNaïve café — déjà vu!\n" * 8,
    "beta.txt": "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind\n" * 6,
    "gamma.txt": "日本語のテキスト。Ünïcödé and emoji 🎉🚀 mixed with ASCII words.\n" * 5,
    "delta.txt": "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * 7,
}
