import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from inference.speech import WHISPER_RATE, AudioError, Transcriber, load_audio, resample, to_mono_float


def test_espeak_question_is_transcribed(transcriber, speech_wav):
    samples, rate = soundfile.read(speech_wav)
    transcript = transcriber(str(speech_wav))
    # The tiny random whisper's words are meaningless; what matters is the whole path ran on real speech.
    assert isinstance(transcript.text, str) and transcript.text
    assert transcript.seconds == pytest.approx(len(samples) / rate, abs=0.01)
    assert transcript.notice is None


def test_array_input_matches_file_input(transcriber, speech_wav):
    samples, rate = soundfile.read(speech_wav, dtype="int16")
    stereo = np.stack([samples, samples], axis=1)  # Gradio gives (samples, channels)
    from_file, _ = load_audio(str(speech_wav))
    from_array, seconds = load_audio((rate, stereo))
    assert seconds == pytest.approx(len(samples) / rate)
    assert abs(len(from_array) - len(from_file)) <= 2
    n = min(len(from_array), len(from_file))
    assert np.corrcoef(from_array[:n], from_file[:n])[0, 1] > 0.99
    assert transcriber((rate, stereo)).text


def test_non_audio_file_is_rejected_clearly(transcriber, tmp_path):
    fake = tmp_path / "notes.wav"
    fake.write_text("this is not audio")
    with pytest.raises(AudioError, match=r"'notes\.wav' could not be read as audio"):
        transcriber(str(fake))
    with pytest.raises(AudioError, match="not found"):
        transcriber(str(tmp_path / "missing.wav"))


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        ((16_000, np.zeros(0, dtype=np.int16)), "empty or too short"),
        ((16_000, np.zeros(16_000, dtype=np.int16)), "silent"),
        ((16_000, np.zeros((2, 2, 2))), "1-D or 2-D"),
        ((0, np.ones(100)), "sample rate"),
        (b"not a path", "file path or a"),
    ],
)
def test_unusable_audio_raises_audio_error(transcriber, audio, message):
    with pytest.raises(AudioError, match=message):
        transcriber(audio)


def test_long_audio_is_trimmed_with_a_notice(whisper_path):
    transcriber = Transcriber(str(whisper_path), max_seconds=5)
    rate = 8_000
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, rate * 40).astype(np.float32)
    transcript = transcriber((rate, noise))
    assert transcript.seconds == 5
    assert "first 5 s of the 40 s" in transcript.notice


def test_english_only_model_refuses_other_languages(whisper_path):
    with pytest.raises(ValueError, match="English-only"):
        Transcriber(str(whisper_path), language="fr")


def test_integer_formats_scale_to_unit_range():
    assert to_mono_float(np.array([-32768, 0, 32767], dtype=np.int16)).tolist() == pytest.approx([-1, 0, 1], abs=1e-4)
    assert to_mono_float(np.array([0, 128, 255], dtype=np.uint8)).tolist() == pytest.approx([-1, 0, 1], abs=1e-2)
    assert to_mono_float(np.array([[0.5, -0.5], [1.0, 0.0]])).tolist() == [0.0, 0.5]  # channel mean


@pytest.mark.parametrize("rate", [8_000, 44_100, 48_000])
def test_resampling_keeps_pitch_and_duration(rate):
    seconds, pitch = 2.0, 440.0
    t = np.arange(int(rate * seconds)) / rate
    out = resample(np.sin(2 * np.pi * pitch * t), rate, WHISPER_RATE)
    assert len(out) == int(WHISPER_RATE * seconds)
    spectrum = np.abs(np.fft.rfft(out))
    assert np.fft.rfftfreq(len(out), 1 / WHISPER_RATE)[spectrum.argmax()] == pytest.approx(pitch, abs=1)
    assert np.abs(out).max() == pytest.approx(1.0, abs=0.05)


HOURS_OF_OPUS, HOURS_OF_SILENCE = 12, 2
PEAK_PROBE = """
import json, sys
from inference.speech import load_audio

def high_water_mark():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024

before = high_water_mark()
results = []
for path in sys.argv[1:]:
    samples, seconds = load_audio(path)
    results.append({"rise": high_water_mark() - before, "decoded": len(samples), "seconds": seconds})
print(json.dumps(results))
"""


def ffmpeg(*arguments: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *arguments], check=True)


@pytest.fixture(scope="module")
def long_recordings(tmp_path_factory) -> dict[str, Path]:
    """Made here, never committed: 12 hours of speech-band Opus (~25 MB, Gradio's upload limit) and 2 of FLAC silence.

    A minute of noise is encoded once and its packets repeated (no re-encoding), so making them takes seconds.
    """
    folder = tmp_path_factory.mktemp("long-audio")
    minute, opus, flac = folder / "minute.opus", folder / "hours.opus", folder / "silence.flac"
    ffmpeg(
        "-f", "lavfi", "-i", "anoisesrc=r=16000:a=0.3:d=60", "-ac", "1", "-c:a", "libopus", "-b:a", "6k", str(minute)
    )
    ffmpeg("-stream_loop", str(60 * HOURS_OF_OPUS - 1), "-i", str(minute), "-c", "copy", str(opus))
    ffmpeg(
        "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", str(3600 * HOURS_OF_SILENCE), "-c:a", "flac", str(flac)
    )
    return {"opus": opus, "flac": flac}


def test_hours_of_audio_cost_only_their_first_30_seconds(long_recordings):
    """Decoding the whole file (whisper.load_audio) would hold GBs of samples; only 30 s (+1) are decoded."""
    paths = [str(long_recordings["opus"]), str(long_recordings["flac"])]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    probe = subprocess.run([sys.executable, "-c", PEAK_PROBE, *paths], capture_output=True, text=True, env=environment)
    assert probe.returncode == 0, probe.stderr[-2000:]
    for result, hours in zip(json.loads(probe.stdout), (HOURS_OF_OPUS, HOURS_OF_SILENCE), strict=True):
        assert result["decoded"] == 30 * WHISPER_RATE  # the first 30 s, cut from the 31 s decoded
        assert result["seconds"] == pytest.approx(3600 * hours, abs=1)  # from the header, without decoding it
        assert result["rise"] < 200 * 2**20, result  # the process's peak memory, measured from before the first


def test_a_long_recording_is_answered_from_its_first_30_seconds(transcriber, long_recordings):
    transcript = transcriber(str(long_recordings["opus"]))
    assert transcript.seconds == 30 and f"first 30 s of the {3600 * HOURS_OF_OPUS} s" in transcript.notice
    with pytest.raises(AudioError, match="silent"):
        transcriber(str(long_recordings["flac"]))
