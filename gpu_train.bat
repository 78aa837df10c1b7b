@echo off
rem gpu_train.bat - double-click to train an image classifier on .\dataset (Windows).
rem
rem   gpu_train.bat                         the guide's defaults (efficientnet_b0, 2 classes,
rem                                         batch 32, 50 epochs, --amp) on .\dataset
rem   gpu_train.bat --demo                  any arguments replace the defaults and go to
rem   gpu_train.bat --resume output\checkpoint.pth --epochs 100      gpu_train.py unchanged
rem
rem The first run creates .venv and installs requirements.txt into it; a later run installs
rem again only when requirements.txt has changed since (.venv\.installed is its copy).
setlocal
cd /d "%~dp0"

set "VENV_PY=.venv\Scripts\python.exe"
set "MARKER=.venv\.installed"
set "DEFAULT_ARGS=--data-dir ./dataset --model efficientnet_b0 --num-classes 2 --batch-size 32 --epochs 50 --amp"

if exist "%VENV_PY%" goto check_install
call :find_python
if errorlevel 1 goto no_python
echo Creating the virtual environment .venv with %PY_CMD% ...
%PY_CMD% -m venv .venv
if errorlevel 1 goto venv_failed
if not exist "%VENV_PY%" goto venv_failed

:check_install
if not exist "%MARKER%" goto install
fc /b requirements.txt "%MARKER%" >nul 2>&1
if errorlevel 1 goto install
goto run

:install
echo Installing the requirements into .venv - the first time this takes several minutes ...
"%VENV_PY%" -m pip install -r requirements.txt
if errorlevel 1 goto install_failed
copy /y requirements.txt "%MARKER%" >nul
"%VENV_PY%" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >nul 2>&1
if errorlevel 1 call :cpu_torch_notice

:run
if "%~1"=="" goto run_defaults
echo Running: gpu_train.py %*
"%VENV_PY%" gpu_train.py %*
goto after_run

:run_defaults
echo Running: gpu_train.py %DEFAULT_ARGS%
"%VENV_PY%" gpu_train.py %DEFAULT_ARGS%

:after_run
set "CODE=%ERRORLEVEL%"
echo.
if "%CODE%"=="0" goto succeeded
echo training FAILED (exit code %CODE%) - see the message above and output\training.log
goto finish

:succeeded
if not "%~1"=="" goto succeeded_with_args
echo training finished, outputs in ./output
goto finish

:succeeded_with_args
echo training finished, outputs in ./output unless --output, --resume or --demo chose another folder

:finish
pause
exit /b %CODE%

rem ---------------------------------------------------------------------------------------

:find_python
rem Sets PY_CMD to the first Python 3.10+ found: the py launcher, then python on PATH.
rem The check runs Python itself, so the Microsoft Store stub "python" does not count.
set "PY_CMD="
py -3 -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)" >nul 2>&1
if not errorlevel 1 set "PY_CMD=py -3"
if defined PY_CMD exit /b 0
python -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)" >nul 2>&1
if not errorlevel 1 set "PY_CMD=python"
if defined PY_CMD exit /b 0
exit /b 1

:cpu_torch_notice
echo.
echo notice: the installed PyTorch cannot use a GPU here. On Windows, pip's default torch is
echo the CPU build; for an NVIDIA GPU install the CUDA build into .venv with the command from
echo https://pytorch.org/get-started/locally/ - e.g.
echo   .venv\Scripts\python.exe -m pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126 --force-reinstall
echo Training still runs, on the CPU.
echo.
exit /b 0

:no_python
echo.
echo error: Python 3.10 or newer was not found (tried "py -3" and "python").
echo Install it from https://www.python.org/downloads/ and tick "Add python.exe to PATH"
echo in the installer, then double-click gpu_train.bat again.
echo.
pause
exit /b 1

:venv_failed
echo.
echo error: could not create the virtual environment .venv with %PY_CMD%.
echo Delete the .venv folder if it exists, check that Python 3.10+ works, and run gpu_train.bat again.
echo.
pause
exit /b 1

:install_failed
echo.
echo error: installing the requirements into .venv failed - see pip's message above.
echo Check the internet connection (or proxy) and free disk space, then run gpu_train.bat again;
echo it retries the installation until one succeeds.
echo.
pause
exit /b 1
