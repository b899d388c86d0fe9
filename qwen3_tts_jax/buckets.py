"""Shape buckets: the padded sizes that compiled programs are built for, so that requests of similar
size reuse one program instead of compiling their own."""


def power_of_two(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def ladder(n: int, minimum: int = 16) -> int:
    """The next of minimum, 1.5 x minimum, 2 x minimum, 3 x minimum, 4 x ... (powers of two and
    1.5x powers of two when minimum is a power of two) >= n: at most +50 % padded work, and about
    two programs per doubling of the size."""
    b = minimum
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


def fine(n: int, minimum: int = 16) -> int:
    """n rounded up to an eighth of its power of two (steps of 8 up to 64, 16 up to 128, ...), at
    least `minimum`: at most +12.5 % padded work, about 4 sizes per doubling; never above
    `ladder(n)`. The prefill's compute length (`generate.prefill_length`)."""
    step = max(8, power_of_two(n, minimum) // 8)
    return max(minimum, -(-int(n) // step) * step)


def batch_rows(n: int, min_rows: int = 1) -> int:
    """The padded batch size for n rows: a power of two, at least `min_rows`
    (`Options.min_rows`: two on a GPU)."""
    return power_of_two(max(n, min_rows), 1)
