"""Headless Chromium for the page tests (Debian's chromium + chromium-driver through selenium), and what it
saw of the Content-Security-Policy: the console log and the page's own securitypolicyviolation events."""
from __future__ import annotations

import shutil

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Chromium's console says "Refused to ..." (older versions) or "... violates the following Content Security
# Policy directive ..." (newer), from the "security" source
CSP_MARKS = ("content security policy", "refused to")


def chromium(console_log: bool = False, window: str = "1280,800", extra_args: tuple = ()):
    """A headless Chromium session. console_log: keep every console entry (driver.get_log("browser")) and record
    each CSP violation the page reports in window.__cspViolations, from the first script of every page on.
    extra_args: more command-line switches (e.g. --ignore-certificate-errors-spki-list=HASH)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for tool in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(tool), f"{tool} missing: make test installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}", *extra_args):
        options.add_argument(arg)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    if console_log:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
            "window.__cspViolations = [];"
            "document.addEventListener('securitypolicyviolation', (e) => window.__cspViolations.push("
            "e.effectiveDirective + ' blocked ' + (e.blockedURI || 'inline') + ' at ' + e.sourceFile + ':' + "
            "e.lineNumber));")})
    return driver


def csp_complaints(driver) -> list[str]:
    """The console entries about the Content-Security-Policy since the last call (reading the log empties it),
    and the violations the current page reported."""
    console = [f"{e['level']} {e.get('source', '')}: {e['message']}" for e in driver.get_log("browser")
               if e.get("source") == "security" or any(m in e["message"].lower() for m in CSP_MARKS)]
    return console + (driver.execute_script("return window.__cspViolations || []") or [])
