"""The search page at `/`, driven in a real headless Chromium (Debian's chromium + chromium-driver, through
Selenium) against the real service on a real port, over the tri-modal `media` index (pictures, sounds, captions,
token vectors). What a person does: type a query, upload a picture and a sound, switch to late interaction and
hover a query word, open a shared URL, follow "more like this", hit an error, use only the keyboard, use a phone.

Screenshots land in build/test-artifacts/ (or $XMODAL_TEST_ARTIFACTS) to be looked at."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.conftest import ServerThread

pytestmark = pytest.mark.slow
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the `dev` extra")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(
    os.environ.get("XMODAL_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "build" / "test-artifacts")
)
# As the machine's own probe starts it: no sandbox (root), and nothing that reaches for the network.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
]


@pytest.fixture(scope="module")
def server(late_data: Path):
    with ServerThread(Settings(data_dir=late_data, reload_interval_s=0)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(
            "no Chromium and ChromeDriver on PATH: `make test` installs Debian's chromium and chromium-driver where "
            "apt-get can run; elsewhere install them to run the browser tests"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_window_size(1280, 900)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server: ServerThread):
    """The browser at a fresh page; each test ends with no error logged by the page's script."""
    browser.set_window_size(1280, 900)
    browser.get_log("browser")  # drop what earlier tests left

    def open_(query: str = "") -> None:
        browser.get(f"{server.url}/{query}")
        wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")

    yield open_
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    unexpected = [e for e in errors if "the server responded with a status of 4" not in e["message"]]
    assert not unexpected, unexpected  # 4xx answers that a test asked for are logged by Chromium; nothing else


def wait(driver, condition, timeout: float = 30):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        shot = ARTIFACTS / "timeout.png"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        raise


def searches(driver) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-searches") or 0)


def search_done(driver, before: int) -> None:
    wait(driver, lambda d: searches(d) > before)


def cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def card_ids(driver) -> list[str]:
    return [c.get_attribute("data-id") for c in cards(driver)]


def api_search(server: ServerThread, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/search", json={"index": "media", **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def set_targets(driver, wanted: set[str]) -> None:
    for box in driver.find_elements(By.CSS_SELECTOR, "#targets input"):
        if box.is_selected() != (box.get_attribute("value") in wanted):
            box.click()


def test_typed_query_shows_the_services_results_and_lives_in_the_url(browser, server, page) -> None:
    page()
    assert browser.find_element(By.ID, "index").get_attribute("value") == "media"
    set_targets(browser, {"image"})
    before = searches(browser)
    box = browser.find_element(By.ID, "q")
    box.send_keys("two red circles", Keys.ENTER)
    search_done(browser, before)
    expected = api_search(server, query={"text": "two red circles"}, modalities=["image"], k=12)
    assert card_ids(browser) == [r["id"] for r in expected["results"]]
    top = cards(browser)[0]
    assert "red" in top.find_element(By.CSS_SELECTOR, ".caption").text
    thumb = top.find_element(By.CSS_SELECTOR, ".visual img")
    wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb))
    assert browser.execute_script("return arguments[0].naturalWidth", thumb) == 256  # the server-side thumbnail
    query = parse_qs(urlparse(browser.current_url).query)
    assert query == {"q": ["two red circles"], "index": ["media"], "modalities": ["image"]}
    status = browser.find_element(By.ID, "status").text
    assert "12 results" in status and " ms" in status
    # reloading the URL runs the same search again (now from the cache)
    browser.refresh()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert card_ids(browser) == [r["id"] for r in expected["results"]]
    assert "from the cache" in browser.find_element(By.ID, "status").text


def test_uploaded_picture_and_sound_find_themselves(browser, server, page, media_corpus: Path) -> None:
    page()
    for modality, path in (
        ("image", media_corpus.parent / "images" / "img-00007.png"),
        ("audio", media_corpus.parent / "sounds" / "snd-00011.flac"),
    ):
        set_targets(browser, {modality})
        before = searches(browser)
        browser.find_element(By.ID, "file").send_keys(str(path))
        search_done(browser, before)
        assert card_ids(browser)[0] == path.stem, (modality, card_ids(browser)[:3])
        assert cards(browser)[0].get_attribute("data-modality") == modality
        preview = browser.find_element(By.ID, "query-file-image" if modality == "image" else "query-file-audio")
        assert preview.is_displayed()
    # a sound result has a player for its own file and a waveform picture
    top = cards(browser)[0]
    player = top.find_element(By.TAG_NAME, "audio")
    assert "/v1/indexes/media/media?id=snd-00011&modality=audio" in player.get_attribute("src")
    assert "waveform" in top.find_element(By.CSS_SELECTOR, ".visual img").get_attribute("src")
    browser.find_element(By.ID, "clear-file").click()
    assert not browser.find_element(By.ID, "query-file").is_displayed()

    # dropped on the drop zone (a real drop event carrying the file's bytes, as a file manager sends it)
    set_targets(browser, {"image"})
    before = searches(browser)
    browser.execute_script(
        "const [zone, done] = arguments;"
        "fetch('/v1/indexes/media/media?id=img-00021').then(r => r.blob()).then(blob => {"
        "  const data = new DataTransfer();"
        "  data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));"
        "  zone.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));"
        "});",
        browser.find_element(By.ID, "drop"),
    )
    search_done(browser, before)
    assert card_ids(browser)[0] == "img-00021"
    assert "dropped.png" in browser.find_element(By.ID, "query-file-name").text


def spot_box(browser, card) -> list[float]:
    """The highlight's box as fractions of its picture, read from the layout the browser computed."""
    return browser.execute_script(
        "const s = arguments[0].querySelector('.spot'), v = s.parentElement.getBoundingClientRect(),"
        " b = s.getBoundingClientRect();"
        "return [(b.left - v.left) / v.width, (b.top - v.top) / v.height,"
        " (b.right - v.left) / v.width, (b.bottom - v.top) / v.height];",
        card,
    )


def test_late_mode_highlights_the_matched_patch_frames_and_words(browser, server, page) -> None:
    page("?q=two+red+circles&index=media&mode=late&modalities=image")
    assert browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=late]").is_selected()
    expected = api_search(
        server, query={"text": "two red circles"}, modalities=["image"], k=12, mode="late", late={"explain": True}
    )
    assert card_ids(browser) == [r["id"] for r in expected["results"]]
    tokens = browser.find_elements(By.CSS_SELECTOR, "#token-list .token")
    assert [t.text for t in tokens] == [m["query_text"] for m in expected["results"][0]["matches"]]
    red = next(t for t in tokens if t.text == "red")
    first = cards(browser)[0]
    assert not first.find_element(By.CSS_SELECTOR, ".spot").is_displayed()
    ActionChains(browser).move_to_element(red).perform()
    wait(browser, lambda d: first.find_element(By.CSS_SELECTOR, ".spot").is_displayed())
    match = next(m for m in expected["results"][0]["matches"] if m["query_text"] == "red")
    assert spot_box(browser, first) == pytest.approx(match["box"], abs=0.02)
    # the heat map: one cell per patch, the best-matching one left clear, the worst darkest
    dims = browser.execute_script(
        "return [...arguments[0].querySelectorAll('.heat span')]"
        ".map(c => parseFloat(c.style.getPropertyValue('--dim')))",
        first,
    )
    heat = api_search(
        server, query={"text": "two red circles"}, modalities=["image"], k=12, mode="late", late={"heatmap": True}
    )["results"][0]["matches"][match["query_token"]]["heat"]
    assert len(dims) == len(heat) == 16
    assert int(np.argmin(dims)) == int(np.argmax(heat)) and dims[int(np.argmin(heat))] == pytest.approx(0.72)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-late-hover.png"))
    ActionChains(browser).move_by_offset(0, 400).perform()  # away: the highlight goes
    wait(browser, lambda d: not first.find_element(By.CSS_SELECTOR, ".spot").is_displayed())

    # a sound: the matched frames on its waveform
    before = searches(browser)
    page("?q=three+short+high+beeps&index=media&mode=late&modalities=audio")
    expected = api_search(
        server,
        query={"text": "three short high beeps"},
        modalities=["audio"],
        k=12,
        mode="late",
        late={"explain": True},
    )
    assert searches(browser) > before or card_ids(browser)
    token = browser.find_elements(By.CSS_SELECTOR, "#token-list .token")[2]
    ActionChains(browser).move_to_element(token).perform()
    first = cards(browser)[0]
    wait(browser, lambda d: first.find_element(By.CSS_SELECTOR, ".spot").is_displayed())
    match = next(m for m in expected["results"][0]["matches"] if m["query_token"] == 2)
    assert match["modality"] == "audio" and match["where"].startswith("frames ")
    assert spot_box(browser, first) == pytest.approx(match["box"], abs=0.02)

    # text: the matched word of the caption
    page("?q=a+red+circle&index=media&mode=late&modalities=text")
    expected = api_search(
        server, query={"text": "a red circle"}, modalities=["text"], k=12, mode="late", late={"explain": True}
    )
    token = next(t for t in browser.find_elements(By.CSS_SELECTOR, "#token-list .token") if t.text == "red")
    ActionChains(browser).move_to_element(token).perform()
    first = cards(browser)[0]
    wait(browser, lambda d: first.find_elements(By.CSS_SELECTOR, ".caption mark"))
    top = expected["results"][0]
    match = next(m for m in top["matches"] if m["query_text"] == "red")
    start, end = match["chars"]
    assert first.find_element(By.CSS_SELECTOR, ".caption mark").text == top["text"][start:end]


def test_more_like_this_searches_with_the_item_and_says_so_in_the_url(browser, server, page) -> None:
    page("?q=one+green+square&index=media&modalities=image")
    target = cards(browser)[3]
    item = target.get_attribute("data-id")
    before = searches(browser)
    target.find_element(By.CSS_SELECTOR, "button.like").click()
    search_done(browser, before)
    assert card_ids(browser)[0] == item  # the picture finds itself first
    query = parse_qs(urlparse(browser.current_url).query)
    assert query["like"] == [item] and query["lm"] == ["image"] and "q" not in query
    # the browser's back button returns to the text search
    before = searches(browser)
    browser.back()
    search_done(browser, before)
    assert browser.find_element(By.ID, "q").get_attribute("value") == "one green square"


def test_errors_show_the_services_message(browser, server, page) -> None:
    page("?q=anything&index=no-such-index")
    alert = browser.find_element(By.ID, "error")
    assert alert.is_displayed()
    served = httpx.post(f"{server.url}/v1/search", json={"index": "no-such-index", "query": {"text": "anything"}})
    assert served.status_code == 404 and served.json()["error"]["message"] in alert.text and "404" in alert.text
    assert not cards(browser)

    page("?q=anything&index=media&k=5000")
    assert "k: Input should be less than or equal to 1000" in browser.find_element(By.ID, "error").text

    page()
    browser.find_element(By.ID, "filter").send_keys('{"kind": ')
    before = searches(browser)
    browser.find_element(By.ID, "q").send_keys("red", Keys.ENTER)
    search_done(browser, before)
    assert "not valid JSON" in browser.find_element(By.ID, "error").text
    # a valid filter narrows the results; the error goes away
    browser.find_element(By.ID, "filter").clear()
    browser.find_element(By.ID, "filter").send_keys("kind=sound")
    before = searches(browser)
    browser.find_element(By.ID, "go").click()
    search_done(browser, before)
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert card_ids(browser) and all(i.startswith("snd-") for i in card_ids(browser))


def active(browser):
    return browser.switch_to.active_element


def tab_until(browser, predicate, limit: int = 80) -> None:
    for _ in range(limit):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        if predicate(active(browser)):
            return
    raise AssertionError("not reachable with the Tab key")


def test_keyboard_only(browser, server, page) -> None:
    page()
    browser.find_element(By.TAG_NAME, "body").click()
    tab_until(browser, lambda e: e.get_attribute("id") == "q")
    before = searches(browser)
    ActionChains(browser).send_keys("two red circles", Keys.ENTER).perform()
    search_done(browser, before)
    assert cards(browser)
    # the mode switch by keyboard, then the search again
    tab_until(browser, lambda e: e.get_attribute("name") == "mode")
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()  # radio group: dense -> late
    assert browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=late]").is_selected()
    browser.find_element(By.ID, "q").click()
    before = searches(browser)
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    search_done(browser, before)
    # focus reaches a query token (and shows its match), then a "more like this" button, which Enter follows
    tab_until(browser, lambda e: "token" in (e.get_attribute("class") or ""))
    wait(browser, lambda d: any(s.is_displayed() for s in d.find_elements(By.CSS_SELECTOR, ".spot")))
    tab_until(browser, lambda e: "like" in (e.get_attribute("class") or "").split())
    before = searches(browser)
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    search_done(browser, before)
    assert "like=" in browser.current_url


def screenshot(browser, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    browser.save_screenshot(str(path))
    picture = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("L"), dtype=np.float32)
    assert picture.std() > 20, f"{name} looks blank"
    return path


def test_desktop_and_phone_screenshots(browser, server, page) -> None:
    page("?q=two+red+circles&index=media&mode=late")
    ActionChains(browser).move_to_element(browser.find_elements(By.CSS_SELECTOR, "#token-list .token")[2]).perform()
    shot = screenshot(browser, "page-desktop.png")
    # the README's picture (docs/search-page.png) is this one, in 96 colours
    small = (
        Image.open(shot).convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    )
    small.save(ARTIFACTS / "search-page.png", optimize=True)
    browser.set_window_size(390, 844)  # a phone
    page("?q=three+short+high+beeps&index=media")
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page scrolls sideways on a phone: {width}"
    for element_id in ("q", "go", "index", "k", "filter"):
        box = browser.find_element(By.ID, element_id).rect
        assert box["x"] >= 0 and box["x"] + box["width"] <= width[1] + 1, (element_id, box)
    assert cards(browser)[0].rect["width"] > 120
    screenshot(browser, "page-phone.png")


def test_with_api_keys_the_page_asks_for_one_and_then_searches_and_shows_media(browser, late_data: Path) -> None:
    """XMODAL_API_KEYS set: the page's first call is refused, the key field appears; a wrong key is 403 and marked;
    the right one loads the indexes, runs the search and shows thumbnails fetched with the key (blob URLs)."""
    with ServerThread(Settings(data_dir=late_data, reload_interval_s=0, api_keys="k-page-1")) as keyed:
        browser.get(f"{keyed.url}/?q=two+red+circles&modalities=image")
        wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        assert "Error 401" in browser.find_element(By.ID, "error").text
        key = browser.find_element(By.ID, "api-key")
        assert key.is_displayed() and key.get_attribute("type") == "password"
        key.send_keys("wrong", Keys.ENTER)
        wait(browser, lambda d: "Error 403" in d.find_element(By.ID, "error").text)
        assert key.get_attribute("aria-invalid") == "true"
        key.clear()
        before = searches(browser)
        key.send_keys("k-page-1", Keys.ENTER)
        search_done(browser, before)
        assert browser.find_element(By.ID, "error").is_displayed() is False
        assert len(cards(browser)) == 12
        thumb = cards(browser)[0].find_element(By.CSS_SELECTOR, ".visual img")
        wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb))
        assert thumb.get_attribute("src").startswith("blob:")
        assert browser.execute_script("return arguments[0].naturalWidth", thumb) == 256
        # the key stays for this tab: a reload searches at once
        browser.refresh()
        wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        assert len(cards(browser)) == 12
        browser.execute_script("sessionStorage.clear()")
    browser.get_log("browser")  # the 401/403 this test asked for
