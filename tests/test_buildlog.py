"""The attempt's log file: UTF-8 written and flushed at once (the sender reads
it as it grows), lines of the runner's own always start on a fresh line, and
nothing is written after it is closed."""

from __future__ import annotations

from ci.buildlog import BuildLog


def test_writes_are_on_disk_at_once_and_counted(tmp_path):
    woken = []
    log = BuildLog(tmp_path / "1-1.log", lambda: woken.append(log.size))
    log.write("héllo")
    assert (tmp_path / "1-1.log").read_bytes() == "héllo".encode()     # flushed, not buffered
    assert log.size == len("héllo".encode()) and woken == [log.size]
    log.write("")
    assert len(woken) == 1, "an empty write wakes nobody"
    log.line("[exit 0 after 0.01s]")        # the step's output did not end its line
    log.write("next\n")
    log.line("[done]")
    log.close()
    assert (tmp_path / "1-1.log").read_text() == "héllo\n[exit 0 after 0.01s]\nnext\n[done]\n"
    assert log.size == (tmp_path / "1-1.log").stat().st_size
    log.write("after the end")
    log.close()
    assert log.size == (tmp_path / "1-1.log").stat().st_size


def test_text_that_is_not_valid_unicode_is_replaced(tmp_path):
    log = BuildLog(tmp_path / "2-1.log")
    log.write("bad \udcff surrogate\n")
    log.close()
    assert (tmp_path / "2-1.log").read_text() == "bad ? surrogate\n"


def test_fed_pieces_are_what_decoding_them_gives_whatever_the_cuts(tmp_path):
    """``feed`` writes ASCII pieces as they are; the file is always what decoding the
    whole output with 'replace' and encoding it gives: characters cut between pieces,
    bytes that are not UTF-8, a character cut short at the end."""
    import codecs
    import random
    rng = random.Random(16)
    alphabet = [b"plain ", b"\n", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x99\x82", b"\xff", b"\xc3", b"\x80"]
    for trial in range(300):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 8))))
        path = tmp_path / f"{trial}.log"
        log = BuildLog(path)
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            log.feed(data[a:b])
        log.feed_end()
        log.close()
        want = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=True).encode()
        assert path.read_bytes() == want, (trial, data, cuts)
        assert log.size == len(want)


def test_a_fed_piece_is_masked_and_a_line_of_the_runners_starts_a_fresh_line(tmp_path):
    from ci.masking import Masker
    log = BuildLog(tmp_path / "3-1.log")
    log.mask = Masker(["s3cret"])
    log.feed(b"token s3c")
    log.feed(b"ret here")
    log.line("[exit 0]")
    log.feed(b"ok\n")
    log.line("[done]")
    log.close()
    assert (tmp_path / "3-1.log").read_text() == "token *** here\n[exit 0]\nok\n[done]\n"


def test_a_big_log_is_synced_behind_the_writer_and_nothing_is_lost_or_left_open(tmp_path):
    """Past SYNC_EVERY bytes a sync starts in a thread of its own (on a duplicate of the
    file's descriptor, closed after it); the writes go on meanwhile, all in order."""
    import os
    import time
    from ci import buildlog
    fds = len(os.listdir("/proc/self/fd"))
    log = BuildLog(tmp_path / "4-1.log")
    piece = b"0123456789abcdef" * 4096         # 64 KiB
    count = 3 * buildlog.SYNC_EVERY // len(piece) + 1
    for _ in range(count):
        log.feed(piece)
    assert log._synced >= buildlog.SYNC_EVERY

    def settled() -> None:
        deadline = time.monotonic() + 30
        while log._syncing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not log._syncing, "the sync behind did not end within 30 s"
    settled()
    before, extra = log._synced, 0
    while log._synced == before and extra <= buildlog.SYNC_EVERY // len(piece):
        log.feed(piece)
        extra += 1
    assert log._synced == log.size > before     # the next began with the write that crossed SYNC_EVERY
    settled()
    log.close()
    assert (tmp_path / "4-1.log").read_bytes() == piece * (count + extra)
    assert len(os.listdir("/proc/self/fd")) == fds, "a descriptor was left open"
